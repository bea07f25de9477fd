"""Detector bundles: one folder that holds everything a detector is, readable without unpickling anything.

::

    my-detector/
      detector.json      format, version, name, the model (how to load it, its input), the DetectorConfig
      calibration.json   the calibrated rule (pipeline.calibration; the transplant's host images inside it)
      model.pt2 | model.ts | weights.pt    the network, for the kinds that carry it (pipeline.models.source)

Every file is JSON, a ``torch.export`` or TorchScript archive, or a state dict read with
``torch.load(weights_only=True)``; each file's SHA-256 is recorded and checked when the bundle loads.
docs/bundle.md is the format's reference.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.calibration import Calibration
from pipeline.config import DetectorConfig
from pipeline.decision import Decider
from pipeline.models import TargetModel, load_model, wrap_network
from pipeline.models.source import bundle_file, load_network, save_network, sha256, source_from_record

BUNDLE_FORMAT = "explainer-detector"
BUNDLE_VERSION = 1
MANIFEST = "detector.json"
CALIBRATION_FILE = "calibration.json"
MAX_NAME_CHARS = 64  # a request's ``model`` field picks a detector by this name (worker.wire's limit)
# what a bundle's JSON files may weigh before they are parsed (json.loads of a hostile file costs up to ~20× its
# size in Python objects); the calibration holds at most pipeline.transplant.MAX_HOSTS host PNGs
MAX_MANIFEST_BYTES = 64 * 1024
MAX_CALIBRATION_BYTES = 8 * 1024 * 1024
DIGEST_PREFIX = "sha256:"


NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")


def check_detector_name(name: str) -> str:
    """``name`` if it can name a detector: 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter
    or digit (a request's ``model`` field, a metric label, a folder name)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"detector name {name!r}: 1 to {MAX_NAME_CHARS} ASCII letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _manifest_bytes(folder: str | Path) -> bytes:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a detector bundle (no {MANIFEST} in it)")
    with open(path, "rb") as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: over {MAX_MANIFEST_BYTES} bytes, not a manifest this package wrote")
    return data


def bundle_digest(folder: str | Path) -> str:
    """``sha256:HEX``, a digest of the whole bundle: the SHA-256 of its ``detector.json``, which records the
    SHA-256 of every file the bundle carries, each checked when the bundle loads. A deployment that holds this
    digest (``Detector.load(..., digest=)``, ``--detector PATH@sha256:HEX``) loads that bundle and no other."""
    return DIGEST_PREFIX + hashlib.sha256(_manifest_bytes(folder)).hexdigest()


def check_digest(digest: str) -> str:
    """``digest`` if it has the form ``sha256:`` and 64 lowercase hex digits."""
    if not isinstance(digest, str) or not re.fullmatch(DIGEST_PREFIX + "[0-9a-f]{64}", digest):
        raise ValueError(f"bundle digest {digest!r}: expected sha256: and 64 lowercase hex digits "
                         "(explainer digest BUNDLE prints it)")
    return digest


def split_pin(ref: str) -> tuple[str, str | None]:
    """A detector reference as a deployment writes it, ``PATH`` or ``PATH@sha256:HEX`` (the bundle pinned to
    one digest, as container images are), split into the path and the digest (None when not pinned)."""
    path, sep, digest = str(ref).rpartition("@")
    if sep and digest.startswith(DIGEST_PREFIX):
        return path, check_digest(digest)
    return str(ref), None


def read_manifest(folder: str | Path, digest: str | None = None) -> dict[str, Any]:
    """The bundle's ``detector.json``, its format and version checked; with ``digest``, refused unless the
    bytes read are the ones pinned (:func:`bundle_digest`)."""
    path = Path(folder) / MANIFEST
    raw = _manifest_bytes(folder)
    if digest is not None:
        found = DIGEST_PREFIX + hashlib.sha256(raw).hexdigest()
        if not hmac.compare_digest(found, check_digest(digest)):
            raise PermissionError(f"{folder}: the bundle's digest is {found}, not the {digest} this deployment "
                                  "pins: a different bundle (replaced or changed) is refused")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    if data.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: not an explainer detector bundle (format {data.get('format')!r})")
    version = data.get("version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise ValueError(f"{path}: bundle version {version} is newer than this explainer reads ({BUNDLE_VERSION}): "
                         "upgrade explainer")
    return data


def save_bundle(model: TargetModel, config: DetectorConfig, calibration: Calibration | None,
                folder: str | Path) -> Path:
    """Write a detector (its model, config and calibration) as a bundle. An existing bundle at ``folder`` is
    replaced whole; any other existing, non-empty folder is refused. The folder is written beside and renamed
    into place, so a reader never sees half a bundle."""
    folder = Path(folder)
    if model.source is None:
        raise ValueError(
            "this detector's network was built in Python and nothing says how to build it again: pass "
            "factory='package.module:callable' to Detector.from_model (its state dict is saved in the bundle), or "
            "give a torch.export program or a TorchScript module")
    if folder.exists() and not is_bundle(folder) and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not a detector bundle: not overwriting it")
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        net = model.net[1] if model.normalize is not None and model.source.kind != "builtin" else model.net
        record = save_network(model.source, net, staging)
        if calibration is not None:
            calibration.save(staging / CALIBRATION_FILE)
        normalize = None if model.normalize is None else {"mean": list(model.normalize[0]),
                                                           "std": list(model.normalize[1])}
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "name": check_detector_name(model.name),
            "model": {"source": record, "input_size": model.size, "channels": model.channels,
                      "normalize": normalize, "resize_to": model.resize_to, "explain_layer": model.explain_layer},
            "config": config.to_dict(),
            "calibration": None if calibration is None else {"file": CALIBRATION_FILE,
                                                             "sha256": sha256(staging / CALIBRATION_FILE)},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _read_spec(folder: Path, digest: str | None) -> tuple[dict, str, DetectorConfig, Calibration | None]:
    """The manifest, name, config and calibration of a bundle: everything but its network."""
    manifest = read_manifest(folder, digest)
    name = check_detector_name(manifest["name"])
    config = DetectorConfig.from_dict(manifest["config"])
    calibration = None
    if manifest.get("calibration") is not None:
        record = manifest["calibration"]
        if not isinstance(record, dict):
            raise ValueError(f"{folder}: malformed calibration record in {MANIFEST}")
        path = bundle_file(folder, record.get("file"), record.get("sha256"))
        if path.stat().st_size > MAX_CALIBRATION_BYTES:
            raise ValueError(f"{path}: over {MAX_CALIBRATION_BYTES} bytes, not a calibration this package wrote")
        calibration = Calibration.load(path)
        if calibration.config and DetectorConfig.from_dict(calibration.config) != config:
            raise ValueError(f"{folder}: the calibration was made with another configuration than the bundle's "
                             "(recalibrate and save the bundle again)")
    return manifest, name, config, calibration


def load_decider(folder: str | Path, digest: str | None = None) -> Decider:
    """What deciding needs of a bundle, its name, config and calibration, without loading its network: JSON
    alone, so it needs no trust (``digest`` pins the bundle as :func:`load_bundle` does)."""
    _, name, config, calibration = _read_spec(Path(folder), digest)
    return Decider(name, config, calibration)


def load_bundle(folder: str | Path, weights: str | Path | None = None, device: str | None = None,
                trust_code: bool = False, digest: str | None = None,
                ) -> tuple[TargetModel, DetectorConfig, Calibration | None]:
    """The model, config and calibration of the detector a bundle holds. ``weights``: a built-in model's weights
    file (a bundle of a user's model carries its own); ``device``: where the model runs (default CPU);
    ``trust_code``: allow a bundle whose network is code (a factory, a torch.export program, TorchScript:
    :func:`pipeline.models.source.source_from_record`); ``digest``: refuse any bundle but the one pinned
    (:func:`bundle_digest`)."""
    folder = Path(folder)
    manifest, name, config, calibration = _read_spec(folder, digest)
    spec = manifest["model"]
    source = source_from_record(spec["source"], folder, weights, trust_code)
    if source.kind == "builtin":
        model = load_model(source.ref, source.weights)
        model.name = name
    else:
        normalize = spec.get("normalize")
        model = wrap_network(
            load_network(source), name=name, input_size=int(spec["input_size"]), channels=int(spec["channels"]),
            normalize=None if normalize is None else (normalize["mean"], normalize["std"]),
            explain_layer=spec.get("explain_layer"), resize_to=spec.get("resize_to"), source=source)
    if device:
        model.to(device)
    return model, config, calibration
