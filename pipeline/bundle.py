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

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.calibration import Calibration
from pipeline.config import DetectorConfig
from pipeline.models import TargetModel, load_model, wrap_network
from pipeline.models.source import bundle_file, load_network, save_network, sha256, source_from_record

BUNDLE_FORMAT = "explainer-detector"
BUNDLE_VERSION = 1
MANIFEST = "detector.json"
CALIBRATION_FILE = "calibration.json"
MAX_NAME_CHARS = 64  # a request's ``model`` field picks a detector by this name (worker.wire's limit)


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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The bundle's ``detector.json``, its format and version checked."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a detector bundle (no {MANIFEST} in it)")
    data = json.loads(path.read_text())
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


def load_bundle(folder: str | Path, weights: str | Path | None = None, device: str | None = None,
                trust_factory: bool = False) -> tuple[TargetModel, DetectorConfig, Calibration | None]:
    """The model, config and calibration of the detector a bundle holds. ``weights``: a built-in model's weights
    file (a bundle of a user's model carries its own); ``device``: where the model runs (default CPU);
    ``trust_factory``: allow a bundle that names a Python callable to build its network
    (:func:`pipeline.models.source.source_from_record`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    name = check_detector_name(manifest["name"])
    spec = manifest["model"]
    source = source_from_record(spec["source"], folder, weights, trust_factory)
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
    config = DetectorConfig.from_dict(manifest["config"])
    calibration = None
    if manifest.get("calibration") is not None:
        record = manifest["calibration"]
        if not isinstance(record, dict):
            raise ValueError(f"{folder}: malformed calibration record in {MANIFEST}")
        calibration = Calibration.load(bundle_file(folder, record.get("file"), record.get("sha256")))
        if calibration.config and DetectorConfig.from_dict(calibration.config) != config:
            raise ValueError(f"{folder}: the calibration was made with another configuration than the bundle's "
                             "(recalibrate and save the bundle again)")
    return model, config, calibration


def bundle_name(folder: str | Path) -> str:
    """The name requests use to pick this bundle's detector (its ``detector.json``'s ``name``)."""
    return check_detector_name(read_manifest(folder)["name"])

