"""Malicious detector bundles, built for real: each one runs a harmless payload (it creates a marker file) when
torch loads or runs its network, or makes the loader allocate gigabytes. A bundle whose network is an exported
program or a TorchScript module is code, not data: it loads only with ``trust_code=True``, and without it the
load is refused before the model file is opened, so none of these payloads runs.

Each attack is a builder that starts from a legitimate bundle, tampers its model file as the bundle's author
could, and records the new digest in ``detector.json`` (the author signs what they ship)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import Detector

BOMB_ELEMENTS = 2**29  # float32: 2 GiB zero-filled by torch.export.load for an empty record
IMAGE = (torch.zeros(2, 1, 28, 28),)
BATCH = ({0: torch.export.Dim("batch", min=1, max=4096)},)


class Digits(nn.Module):
    """A tiny classifier of 28x28 grey digits: the legitimate network every attack starts from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class MapsAFile(nn.Module):
    """A TorchScript layer whose ``__setstate__``, which ``torch.jit.load`` runs, maps a file of its choosing with
    ``torch.from_file(shared=True)``: that creates the file, and writes to the tensor would land in it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.mapped = torch.zeros(1, dtype=torch.uint8)  # kept, so the script compiler cannot drop the call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(state[0], shared=True, size=16, dtype=torch.uint8)


class CreatesAFile(nn.Module):
    """A network whose exported graph calls ``aten.from_file(shared=True)`` on every forward pass: no pickle
    anywhere, the file is created when the detector runs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.net = Digits()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.from_file(self.path, shared=True, size=1, dtype=torch.float32)
        return self.net(x) + side.sum() * 0


class OpensAFile:
    """Unpickled, this opens ``marker`` for writing (creating it): the payload of the pickle attacks."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(OpensAFile(marker), buffer)
    return buffer.getvalue()


# -- bundles and their model files ----------------------------------------------------------------------------


def save_bundle(net: nn.Module | torch.export.ExportedProgram, folder: Path) -> Path:
    return Detector.from_model(net, input_size=28, channels=1, name="evil", preset="digits").save(folder)


def model_file(bundle: Path) -> Path:
    return bundle / json.loads((bundle / "detector.json").read_text())["model"]["source"]["file"]


def entries(bundle: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(model_file(bundle)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def prefix(items: list[tuple[str, bytes]]) -> str:
    """The folder torch.export.save puts every entry in (``model/``)."""
    return next(name for name, _ in items if name.endswith("archive_format"))[: -len("archive_format")]


def write_model(bundle: Path, items: list[tuple[str, bytes]]) -> Path:
    """Replace the bundle's model file with a zip of ``items`` (in order, duplicates kept) and record its new
    digest in detector.json."""
    path = model_file(bundle)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": on purpose
        for name, data in items:
            archive.writestr(name, data)
    manifest = json.loads((bundle / "detector.json").read_text())
    manifest["model"]["source"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (bundle / "detector.json").write_text(json.dumps(manifest, indent=1))
    return bundle


def edit_config(items: list[tuple[str, bytes]], suffix: str, edit) -> list[tuple[str, bytes]]:
    """``items`` with the JSON entry ending in ``suffix`` replaced by ``edit(its dict)``."""
    return [(n, json.dumps(edit(json.loads(d))).encode() if n.endswith(suffix) else d) for n, d in items]


def tensor_meta(items: list[tuple[str, bytes]], **changes) -> dict:
    """A weight's tensor_meta from the archive, with ``changes``."""
    config = json.loads(next(d for n, d in items if n.endswith("model_weights_config.json")))["config"]
    return {**next(iter(config.values()))["tensor_meta"], **changes}


# -- the attacks: each takes a copy of the legitimate exported bundle (or a folder) and a marker path ---------


def pickled_legacy_weights(bundle: Path, marker: Path) -> Path:
    """A legacy ``data/weights/model.pt``: torch.export.load prefers it, tries ``weights_only=True`` and retries
    with ``weights_only=False``. No ``use_pickle`` flag in the ``*_config.json`` files marks it."""
    items = entries(bundle)
    return write_model(bundle, items + [(f"{prefix(items)}data/weights/model.pt", torch_pickle(marker))])


def pickled_legacy_constants(bundle: Path, marker: Path) -> Path:
    """The same through a legacy ``data/constants/model.pt``."""
    items = entries(bundle)
    return write_model(bundle, items + [(f"{prefix(items)}data/constants/model.pt", torch_pickle(marker))])


def opaque_constant(bundle: Path, marker: Path) -> Path:
    """A constant named ``opaque_obj_*`` with ``use_pickle: false``: torch reads it with ``pickle.loads``."""
    items = entries(bundle)
    meta = tensor_meta(items, dtype=1, sizes=[{"as_int": 1}], strides=[{"as_int": 1}], requires_grad=False)
    record = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": meta}
    items = edit_config(items, "model_constants_config.json", lambda c: {"config": {**c["config"], "evil": record}})
    return write_model(bundle, items + [(f"{prefix(items)}data/constants/opaque_obj_0",
                                         pickle.dumps(OpensAFile(marker)))])


def legacy_archive(bundle: Path, marker: Path) -> Path:
    """A zip of the format before torch 2.7: torch.export.load falls back to its legacy reader, which unpickles
    ``serialized_state_dict.pt`` with ``weights_only=False`` once ``weights_only=True`` refuses it."""
    from torch._export.serde.schema import SCHEMA_VERSION

    items = entries(bundle)
    program = dict(items)[f"{prefix(items)}models/model.json"]
    return write_model(bundle, [("version", f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}".encode()),
                                ("serialized_exported_program.json", program),
                                ("serialized_state_dict.pt", torch_pickle(marker)),
                                ("serialized_constants.pt", b""),
                                ("serialized_example_inputs.pt", b"")])


def duplicate_entry(bundle: Path, marker: Path) -> Path:
    """Two entries named ``data/sample_inputs/model.pt``: Python's zipfile (the archive check) reads the last, a
    clean one; torch's reader finds the first, a pickle it retries with ``weights_only=False``. Which copy torch
    finds depends on where they sit, so the order is chosen by asking torch's own reader."""
    items = entries(bundle)
    name = f"{prefix(items)}data/sample_inputs/model.pt"
    clean = next(item for item in items if item[0] == name)
    rest = [item for item in items if item[0] != name]
    evil = torch_pickle(marker)
    for i in range(len(rest) + 1):
        for j in range(i, len(rest) + 1):
            write_model(bundle, rest[:i] + [(name, evil)] + rest[i:j] + [clean] + rest[j:])
            reader = torch._C.PyTorchFileReader(str(model_file(bundle)))
            if bytes(reader.get_record(name[len(prefix(items)):])) == evil:
                return bundle
    raise AssertionError("torch's zip reader finds the last duplicate wherever it sits")


def memory_bomb(bundle: Path, marker: Path) -> Path:
    """A weight declaring 2**29 float32 elements over an empty record: torch.export.load allocates and zeroes
    2 GiB for a 140 kB file (``marker`` unused)."""
    items = entries(bundle)
    meta = tensor_meta(items, sizes=[{"as_int": BOMB_ELEMENTS}], strides=[{"as_int": 1}], requires_grad=False)
    record = {"path_name": "weight_bomb", "is_param": False, "use_pickle": False, "tensor_meta": meta}
    items = edit_config(items, "model_weights_config.json", lambda c: {"config": {**c["config"], "bomb": record}})
    return write_model(bundle, items + [(f"{prefix(items)}data/weights/weight_bomb", b"")])


def aoti_library(bundle: Path, marker: Path) -> Path:
    """A shared library under ``data/aotinductor/``: torch.export.load hands it to the AOTInductor loader, which
    dlopens it, running its constructor (C code) before it finds the library is no model."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the library")
    source = bundle.parent / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n'
                      f'    FILE *f = fopen({json.dumps(str(marker))}, "w");\n    if (f) fclose(f);\n}}\n')
    library = bundle.parent / "evil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    items = entries(bundle)
    folder = f"{prefix(items)}data/aotinductor/model/"
    return write_model(bundle, items + [(f"{folder}evil.wrapper.so", library.read_bytes()),
                                        (f"{folder}evil.wrapper_metadata.json", b'{"AOTI_DEVICE_KEY": "cpu"}')])


def torchscript_setstate(folder: Path, marker: Path) -> Path:
    """A TorchScript bundle whose layer's ``__setstate__`` creates a file outside the bundle on load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch deprecates TorchScript
        scripted = torch.jit.script(nn.Sequential(MapsAFile(str(marker)), Digits()).eval())
    return save_bundle(scripted, folder)


def from_file_node(folder: Path, marker: Path) -> Path:
    """An exported program with an ``aten.from_file`` node. The op has no meta kernel, so export cannot trace it;
    the author registers one while exporting (the victim never needs it)."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("from_file", lambda filename, shared=None, size=0, **kw: torch.empty(
        size, dtype=kw.get("dtype"), device="meta"), "Meta")
    try:
        program = torch.export.export(CreatesAFile(str(marker)).eval(), IMAGE, dynamic_shapes=BATCH)
    finally:
        library._destroy()
    assert any(node.target is torch.ops.aten.from_file.default for node in program.graph.nodes)
    return save_bundle(program, folder)


TAMPERED = [pickled_legacy_weights, pickled_legacy_constants, opaque_constant, legacy_archive, duplicate_entry,
            memory_bomb, aoti_library]
BUILT = [torchscript_setstate, from_file_node]


@pytest.fixture(scope="module")
def clean_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    program = torch.export.export(Digits().eval(), IMAGE, dynamic_shapes=BATCH)
    return save_bundle(program, tmp_path_factory.mktemp("clean") / "bundle")


@pytest.fixture
def build(clean_bundle, tmp_path):
    """``build(attack)``: the attack's bundle in ``tmp_path``, and the marker its payload would create."""
    marker = tmp_path / "payload-ran"

    def make(attack) -> tuple[Path, Path]:
        if attack in BUILT:
            return attack(tmp_path / "bundle", marker), marker
        shutil.copytree(clean_bundle, tmp_path / "bundle")
        return attack(tmp_path / "bundle", marker), marker

    return make


@pytest.mark.parametrize("attack", TAMPERED + BUILT, ids=lambda attack: attack.__name__)
def test_an_untrusted_code_bundle_is_refused_and_its_payload_never_runs(attack, build, digits):
    bundle, marker = build(attack)
    assert not marker.exists()
    with pytest.raises(PermissionError, match="trust_code"):
        Detector.load(bundle).detect(digits.images[:4], rule="sign")  # were it to load, run it too
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["exported", "torchscript"])
def test_the_refusal_comes_before_the_model_file_is_read(kind, build, monkeypatch):
    """Nothing may parse an untrusted archive, not even a check of it: the refusal is made on the manifest."""
    bundle, _ = build(pickled_legacy_weights if kind == "exported" else torchscript_setstate)

    def opened(*args, **kwargs):
        raise AssertionError("the model file was opened before the bundle was trusted")

    for owner, name in ((torch.export, "load"), (torch.jit, "load"), (zipfile, "ZipFile"),
                        (torch._C, "PyTorchFileReader")):
        monkeypatch.setattr(owner, name, opened)
    with pytest.raises(PermissionError, match="trust_code"):
        Detector.load(bundle)


def test_the_legitimate_bundle_loads_when_trusted(clean_bundle, digits):
    """The bundle the attacks start from is sound: trusted, it loads and detects."""
    result = Detector.load(clean_bundle, trust_code=True).detect(digits.images[:4], rule="sign")
    assert len(result) == 4


def test_trusted_legacy_weights_pickle_runs_its_payload(build):
    """A trusted bundle is trusted code: this proves the file is an attack. torch fails on the payload's return
    value, after it ran."""
    bundle, marker = build(pickled_legacy_weights)
    with contextlib.suppress(Exception):
        Detector.load(bundle, trust_code=True)
    assert marker.exists()


def test_trusted_torchscript_setstate_runs_its_payload_on_load(build):
    """A trusted bundle is trusted code: this proves the file is an attack (the file appears on load)."""
    bundle, marker = build(torchscript_setstate)
    Detector.load(bundle, trust_code=True)
    assert marker.exists()


def test_trusted_from_file_node_runs_its_payload_on_detect(build, digits):
    """A trusted bundle is trusted code: this proves the file is an attack (loading is quiet; detecting creates
    the file)."""
    bundle, marker = build(from_file_node)
    detector = Detector.load(bundle, trust_code=True)
    assert not marker.exists()
    detector.detect(digits.images[:4], rule="sign")
    assert marker.exists()
