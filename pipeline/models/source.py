"""Where a target model's network comes from, and which sources are data and which are code.

Four kinds of source:

- ``builtin``: a model this package defines (:data:`MODEL_NAMES`), with optional weights: a state dict read
  with ``torch.load(weights_only=True)`` (tensors and plain containers only) after its archive is checked
  (:func:`check_state_dict_archive`). The one kind that is data: safe to load from a stranger.
- ``factory``: ``package.module:callable`` (imported by name, so it must be installed or on the path of every
  process that loads it) called with keyword arguments, then its state dict read as above.
- ``exported``: a ``torch.export`` program (``.pt2``, ``torch.export.save``), the format PyTorch recommends.
- ``torchscript``: a TorchScript archive (``torch.jit.save``); PyTorch deprecates TorchScript, so it is read
  for the models that exist in it.

The last three are code (:data:`CODE_KINDS`): ``torch.export.load`` falls back to full unpickling, loads native
libraries and runs whatever operators the graph names (file I/O among them); TorchScript runs the module's own
code. Nothing here proves such a file harmless, so a bundle of those kinds loads only with ``trust_code``. A file
the user names on the command line (``--model``) is their own choice, as an import is.

Refused, each with an error that says what to do instead: a whole pickled module (``torch.save(model)``: loading
it runs code stored in the file), a bare state dict given as a model (it holds no architecture), ONNX (no
gradients in PyTorch, and the explanations need them) and anything else.

An exported program or a TorchScript module runs as one compiled graph: Python hooks on its layers never fire.
Methods and signals that hook a layer (Grad-CAM, DeepLift, the activation norm) need a ``builtin`` or ``factory``
model; gradient methods (saliency, integrated gradients, gradient SHAP, SmoothGrad) work with every kind.
"""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_NAMES = ("mnist", "resnet18", "mobilenet_v2")  # the built-in models (pipeline.models.load_model)
KINDS = ("builtin", "factory", "exported", "torchscript")
HOOKLESS_KINDS = frozenset({"exported", "torchscript"})
MODEL_FILE_SUFFIXES = {".pt2": "exported", ".ts": "torchscript"}
# the kinds whose loading runs code the file's author chose, and how: none of them is proved safe here, so a
# bundle of one of these kinds loads only when the loader trusts its author (source_from_record)
CODE_KINDS = {
    "factory": "this bundle builds its network by calling {factory!r} with arguments {kwargs}",
    "exported": "this bundle's network is a torch.export program, which torch may unpickle, load native code "
                "for, or run file operators from",
    "torchscript": "this bundle's network is a TorchScript module, whose code (its __setstate__ among it) runs "
                   "when it loads",
}
# a state dict's archive may hold at most this many times the bytes of the tensors it fills, plus this slack:
# loading one then costs at most about its own size (STORED entries, each declared size checked by torch)
STATE_DICT_SIZE_FACTOR = 2
STATE_DICT_SLACK_BYTES = 1 << 20
# and its pickle (names and storage references) at most this, plus this much per tensor (twice the network's)
PICKLE_SLACK_BYTES = 64 * 1024
PICKLE_BYTES_PER_TENSOR = 512


@dataclass(frozen=True)
class ModelSource:
    """How to load one network: ``kind`` (one of :data:`KINDS`) and ``ref``: the builtin name, the factory's
    ``module:callable``, or the model file's path. ``weights``: a state-dict file (builtin, factory);
    ``kwargs``: the factory's keyword arguments. ``live``: the in-memory TorchScript module or exported program
    a :meth:`pipeline.Detector.from_model` was given, so that a bundle can serialise it (no file yet)."""

    kind: str
    ref: str | None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    live: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model source kind {self.kind!r}; one of {', '.join(KINDS)}")

    @property
    def hookable(self) -> bool:
        """Whether Python hooks on the network's layers fire (Grad-CAM, DeepLift and the activation norm need them)."""
        return self.kind not in HOOKLESS_KINDS


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_factory_ref(ref: str) -> bool:
    """``package.module:callable`` (not a path: no slash, no file suffix before the colon)."""
    module, sep, attr = ref.partition(":")
    return bool(sep and module and attr) and "/" not in ref and "\\" not in ref and not Path(module).suffix == ".py"


def parse_model_ref(ref: str, weights: str | Path | None = None, kwargs: dict[str, Any] | None = None) -> ModelSource:
    """The source named on a command line: a builtin model name, ``module:callable``, or a model file (its kind
    read from the file itself). A file of a refused format raises ``ValueError`` saying why and what to give."""
    if ref in MODEL_NAMES:
        return ModelSource("builtin", ref, str(weights) if weights else None)
    if is_factory_ref(ref):
        return ModelSource("factory", ref, str(weights) if weights else None, dict(kwargs or {}))
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"model {ref!r} is neither a built-in model ({', '.join(MODEL_NAMES)}), nor "
                                "module:callable, nor an existing file")
    kind = sniff_model_file(path)
    if weights:
        raise ValueError(f"{path} is a {kind} model that carries its weights: --weights applies to module:callable")
    return ModelSource(kind, str(path))


def sniff_model_file(path: Path) -> str:
    """``exported`` or ``torchscript`` from the archive's own layout (not its name); ``ValueError`` otherwise."""
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"{path}: ONNX models are refused: the explanations need gradients through the model, "
                         "which PyTorch does not give for ONNX. Export the PyTorch model with torch.export.save "
                         "(.pt2) instead, or give its module:callable and a state dict")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch model archive; give a torch.export program (.pt2), a TorchScript "
                         "file, or module:callable with --weights STATE_DICT")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any("/models/" in n and n.endswith(".json") for n in names) or any("archive_format" in n for n in names):
        return "exported"
    if any(n.endswith("data.pkl") for n in names):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any failure means the pickle holds more than tensors
            raise ValueError(
                f"{path}: a pickled Python object (torch.save of a whole module) is refused: loading it would "
                "run code stored in the file. Save model.state_dict() and give module:callable with --weights, "
                "or export the model with torch.export.save (.pt2)") from None
        raise ValueError(f"{path}: a state dict holds weights but no architecture; give module:callable that "
                         "builds the network, with --weights pointing at this file")
    raise ValueError(f"{path}: an archive PyTorch cannot load as a model (neither torch.export nor TorchScript)")


def check_exported_archive(path: str | Path) -> None:
    """Refuse a ``torch.export`` archive that would make ``torch.export.load`` unpickle: weights or constants
    stored as pickles (``use_pickle``), or sample inputs that ``torch.load(weights_only=True)`` refuses (the
    loader then retries them with ``weights_only=False``, which runs code from the file)."""
    import io
    import json

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
                config = json.loads(archive.read(name)).get("config", {})
                pickled = [key for key, meta in config.items() if meta.get("use_pickle")]
                if pickled:
                    raise ValueError(f"{path}: the exported program stores {', '.join(pickled[:3])} as pickles, which "
                                     "loading would unpickle (running code from the file): refused. Export a model "
                                     "whose weights and constants are plain tensors")
            elif "/data/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - anything but tensors and plain containers
                    raise ValueError(f"{path}: the exported program's sample inputs are not plain tensors "
                                     "(loading them would unpickle code from the file): refused") from None


def _import_factory(ref: str):
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for model factory {ref!r}: {e}. The module must be "
                         "installed or on PYTHONPATH wherever the detector loads (on a cluster: the runtime "
                         "environment's py_modules or working_dir)") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"model factory {ref!r}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"model factory {ref!r} is not callable")
    return factory


def check_state_dict_archive(path: str | Path, max_bytes: int, max_pickle_bytes: int) -> None:
    """Refuse a state-dict file that could make ``torch.load`` allocate more than its own size, before torch
    reads it: over ``max_bytes``; not a zip archive (the legacy format); an entry compressed (a few KB could
    inflate to gigabytes), named twice (Python's zipfile and torch's reader would see different bytes), or
    entries whose sizes add up to more than the file; or a pickle (``data.pkl``) over ``max_pickle_bytes``: a
    state dict's pickle holds only names and storage references, while one byte of pickle can build a 72-byte
    Python dict. torch itself checks each tensor's declared size against its entry's, and ``weights_only=True``
    unpickles tensors and plain containers only."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: a state dict of {size} bytes, over the {max_bytes} this network's tensors can "
                         "need: refused")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a state dict in torch.save's zip format (a legacy file, or not torch's): "
                         "refused; re-save it with torch.save(torch.load(path, weights_only=True), new_path)")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: the archive names an entry twice: refused")
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
        raise ValueError(f"{path}: the archive holds compressed entries (torch.save stores them plain): refused")
    if sum(i.file_size for i in infos) > size:
        raise ValueError(f"{path}: the archive's entries declare more bytes than the file holds: refused")
    pickles = [i for i in infos if i.filename.endswith(".pkl")]
    if sum(i.file_size for i in pickles) > max_pickle_bytes:
        raise ValueError(f"{path}: its pickle is over the {max_pickle_bytes} bytes this network's names and "
                         "tensors need: refused")


def load_state_dict(net: nn.Module, path: str | Path, what: str, published: bool = False) -> None:
    """``path``'s state dict into ``net`` (``weights_only=True``, strict), or ``ValueError`` naming the keys that
    do not fit: the usual mistake is weights of another architecture. The archive is checked first
    (:func:`check_state_dict_archive`), so loading it costs at most about twice ``net``'s own tensors;
    ``published``: a file the caller verified as its publisher's (torchvision's hub file, by its digest), which
    may be in torch's legacy format."""
    tensors = net.state_dict().values()
    expected = sum(t.numel() * t.element_size() for t in tensors)
    if not published:
        check_state_dict_archive(path, STATE_DICT_SIZE_FACTOR * expected + STATE_DICT_SLACK_BYTES,
                                 PICKLE_SLACK_BYTES + PICKLE_BYTES_PER_TENSOR * STATE_DICT_SIZE_FACTOR * len(tensors))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a file it cannot read as weights
        raise ValueError(f"{path}: cannot be read as a state dict ({type(e).__name__}): save model.state_dict() "
                         "with torch.save") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"{path}: these weights do not fit {what}: {str(e).splitlines()[-1].strip()}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        raise ValueError(f"{path}: these weights do not fit {what}: {len(missing)} of its tensors missing"
                         + (f" ({some(missing)})" if missing else "") + f", {len(unexpected)} unexpected"
                         + (f" ({some(unexpected)})" if unexpected else ""))


def load_network(source: ModelSource) -> nn.Module:
    """The network of ``source`` (builtin models are loaded by :func:`pipeline.models.load_model` instead)."""
    if source.live is not None:
        return source.live.module() if source.kind == "exported" else source.live
    if source.kind == "factory":
        net = _import_factory(source.ref)(**source.kwargs)
        if isinstance(net, torch.export.ExportedProgram):
            net = net.module()
        if not isinstance(net, nn.Module):
            raise ValueError(f"model factory {source.ref!r} returned {type(net).__name__}, not a torch.nn.Module")
        if source.weights:
            load_state_dict(net, source.weights, source.ref)
        return net.eval()
    if source.kind == "exported":
        check_exported_archive(source.ref)
        return torch.export.load(source.ref).module()
    if source.kind == "torchscript":
        import warnings

        with warnings.catch_warnings():  # PyTorch's deprecation notice on every load; docs say so once
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(source.ref, map_location="cpu").eval()
    raise ValueError(f"load_network does not load {source.kind} models")


def save_network(source: ModelSource, net: nn.Module, folder: Path) -> dict[str, Any]:
    """Write what :func:`load_network` needs into ``folder``; returns the bundle's ``model.source`` record. A
    factory is called once here, to check that it rebuilds ``net`` from the saved state dict."""
    if source.kind == "builtin":
        if source.weights is None:  # the default weights (shipped, shared copy or hub cache) wherever it loads
            return {"kind": "builtin", "name": source.ref}
        (folder / "weights.pt").write_bytes(Path(source.weights).read_bytes())
        return {"kind": "builtin", "name": source.ref, "weights": "weights.pt", "sha256": sha256(folder / "weights.pt")}
    if source.kind == "factory":
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "weights.pt")
        load_network(ModelSource("factory", source.ref, str(folder / "weights.pt"), source.kwargs))
        return {"kind": "factory", "factory": source.ref, "kwargs": source.kwargs, "weights": "weights.pt",
                "sha256": sha256(folder / "weights.pt")}
    target = folder / ("model.pt2" if source.kind == "exported" else "model.ts")
    if source.live is not None:
        if source.kind == "exported":
            torch.export.save(source.live, target)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(source.live, str(target))
    else:
        target.write_bytes(Path(source.ref).read_bytes())
    return {"kind": source.kind, "file": target.name, "sha256": sha256(target)}


def bundle_file(folder: Path, name: object, digest: object) -> Path:
    """``folder``/``name``, checked: a plain file inside the bundle whose SHA-256 is ``digest``."""
    if not isinstance(name, str) or not isinstance(digest, str):
        raise ValueError(f"{folder}: every file of a bundle needs its name and its sha256 in detector.json")
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"{folder}: the bundle's file {name!r} lies outside the bundle")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: the bundle's file {name} is missing")
    if sha256(path) != digest:
        raise ValueError(f"{path}: content does not match the digest recorded in the bundle (corrupt or replaced)")
    return path


def source_from_record(record: dict[str, Any], folder: Path, weights: str | Path | None = None,
                       trust_code: bool = False) -> ModelSource:
    """The :class:`ModelSource` a bundle's ``model.source`` record describes, its files checked against their
    digests. ``weights`` replaces a builtin model's (e.g. the shared MobileNetV2 file).

    Only a ``builtin`` record is data: an architecture this package defines and a state dict. Every other kind
    is code the bundle's author wrote (:data:`CODE_KINDS` says how), so it loads only with ``trust_code=True``
    (``--trust-code``), as ``trust_remote_code`` in transformers; the refusal comes before any of its files is
    opened."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{folder}: unknown model source kind {kind!r}")
    if kind == "builtin":
        if record.get("name") not in MODEL_NAMES:
            raise ValueError(f"{folder}: unknown built-in model {record.get('name')!r}")
        if weights is None and record.get("weights") is not None:
            weights = bundle_file(folder, record["weights"], record.get("sha256"))
        return ModelSource("builtin", record["name"], str(weights) if weights else None)
    if weights is not None:
        raise ValueError(f"this bundle's model ({kind}) carries its own weights: weights= applies to built-in models")
    if not trust_code:
        what = CODE_KINDS[kind].format(factory=record.get("factory"), kwargs=record.get("kwargs") or {})
        raise PermissionError(f"{folder}: {what}: loading it runs code its author wrote. Load it only if "
                              "you trust where it came from, with trust_code=True (--trust-code); a bundle of a "
                              "built-in model with a state dict needs no trust")
    if kind == "factory":
        if not is_factory_ref(str(record.get("factory"))) or not isinstance(record.get("kwargs", {}), dict):
            raise ValueError(f"{folder}: malformed factory record")
        path = bundle_file(folder, record.get("weights"), record.get("sha256"))
        return ModelSource("factory", record["factory"], str(path), dict(record.get("kwargs") or {}))
    return ModelSource(kind, str(bundle_file(folder, record.get("file"), record.get("sha256"))))


def source_of(net: object, factory: str | None = None, kwargs: dict[str, Any] | None = None) -> ModelSource | None:
    """How to rebuild a network handed over in Python: its factory when named, else a TorchScript module or an
    exported program serialises itself; None for a plain module (a bundle then needs ``factory``)."""
    if factory is not None:
        if not is_factory_ref(factory):
            raise ValueError(f"factory must be 'package.module:callable', got {factory!r}")
        return ModelSource("factory", factory, None, dict(kwargs or {}))
    if isinstance(net, torch.export.ExportedProgram):
        return ModelSource("exported", None, live=net)
    if isinstance(net, torch.jit.ScriptModule):
        return ModelSource("torchscript", None, live=net)
    return None

