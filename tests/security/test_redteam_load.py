"""Red team: bundles that need no trust (a built-in model, a state dict, JSON) built to cost memory when they load,
and a bundle swapped under a deployment that pins another."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline.transplant
from pipeline import Detector, bundle_digest, split_pin
from pipeline.models.mnist import MnistNet

SHIPPED = Path(pipeline.__file__).parent / "assets" / "detectors" / "mnist"


def copy_shipped(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(SHIPPED, folder)
    return folder


def rewrite(folder: Path, calibration: dict | None = None, weights: bytes | None = None) -> None:
    """Change the bundle's files and record their digests in detector.json, as their author would."""
    manifest = json.loads((folder / "detector.json").read_text())
    if calibration is not None:
        (folder / "calibration.json").write_text(json.dumps(calibration))
        manifest["calibration"]["sha256"] = hashlib.sha256((folder / "calibration.json").read_bytes()).hexdigest()
    if weights is not None:
        (folder / "weights.pt").write_bytes(weights)
        manifest["model"]["source"].update(weights="weights.pt", sha256=hashlib.sha256(weights).hexdigest())
    (folder / "detector.json").write_text(json.dumps(manifest))


def host_png(side: int, dtype=np.uint16, channels: int = 3) -> str:
    image = np.zeros((side, side, channels), dtype)
    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


@pytest.fixture
def no_decode(monkeypatch):
    """Any host PNG decoded fails the test: a refusal must come before the decoder."""
    def refuse(*_):
        raise AssertionError("a host was decoded before it was checked")

    monkeypatch.setattr(pipeline.transplant.cv2, "imdecode", refuse)


def test_a_calibration_of_a_hundred_16_bit_hosts_is_refused_before_decoding(tmp_path, no_decode):
    """100 small 16-bit 1024² RGB PNGs in calibration.json cost +1.6 GiB to load before."""
    folder = copy_shipped(tmp_path)
    calibration = json.loads((folder / "calibration.json").read_text())
    rewrite(folder, {**calibration, "hosts": [host_png(1024)] * 100})
    assert (folder / "calibration.json").stat().st_size < 4 * 1024 * 1024
    with pytest.raises(ValueError, match="over 32 host images"):
        Detector.load(folder)


@pytest.mark.parametrize(("side", "dtype", "channels"), [(1024, np.uint16, 3), (1024, np.uint8, 1),
                                                          (28, np.uint16, 1), (28, np.uint8, 3)])
def test_a_host_that_is_not_the_model_input_is_refused_before_decoding(tmp_path, no_decode, side, dtype, channels):
    folder = copy_shipped(tmp_path)
    calibration = json.loads((folder / "calibration.json").read_text())
    rewrite(folder, {**calibration, "hosts": [host_png(side, dtype, channels)] * 3})
    with pytest.raises(ValueError, match="hosts are 8-bit grey 28×28 images"):
        Detector.load(folder)


def test_an_oversized_calibration_file_is_refused_before_it_is_parsed(tmp_path):
    folder = copy_shipped(tmp_path)
    calibration = json.loads((folder / "calibration.json").read_text())
    rewrite(folder, {**calibration, "padding": [0.5] * 3_000_000})  # 15 MB of floats: ~100 MB once parsed
    with pytest.raises(ValueError, match="not a calibration this package wrote"):
        Detector.load(folder)


def inflating_state_dict(elements: int) -> bytes:
    """The shipped network's state dict with one tensor of ``elements`` zeros stored DEFLATED: a few hundred KB
    that torch.load inflated into ``4 * elements`` bytes."""
    import io

    plain = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, plain)
    out = io.BytesIO()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                size = b"J" + elements.to_bytes(4, "little")
                data = data.replace(b"K\x04tq", size + b"tq", 1).replace(b"K\x04\x85", size + b"\x85", 1)
            if info.filename.endswith("/data/0"):
                dst.writestr(info.filename, bytes(4 * elements), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    return out.getvalue()


def test_a_state_dict_that_inflates_is_refused_before_torch_reads_it(tmp_path):
    """torch.load inflates a DEFLATED entry whatever the file's size: 260 KB became a 256 MiB tensor."""
    bomb = inflating_state_dict(2**26)
    assert len(bomb) < 400_000
    assert torch.load(__import__("io").BytesIO(bomb), weights_only=True)["w"].numel() == 2**26  # a real bomb
    folder = copy_shipped(tmp_path)
    rewrite(folder, weights=bomb)
    with pytest.raises(ValueError, match="compressed entries"):
        Detector.load(folder)


def test_a_state_dict_bigger_than_its_network_or_naming_an_entry_twice_is_refused(tmp_path):
    import io

    folder = copy_shipped(tmp_path)
    state = MnistNet().state_dict()
    big = io.BytesIO()
    torch.save({**state, "extra": torch.zeros(2**20)}, big)  # +4 MiB past what the network holds (~0.5 MiB)
    rewrite(folder, weights=big.getvalue())
    with pytest.raises(ValueError, match="over the .* this network's tensors can need"):
        Detector.load(folder)
    good = io.BytesIO()
    torch.save(state, good)
    twice = io.BytesIO()
    with zipfile.ZipFile(good) as src:
        entries = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(twice, "w") as dst:
        for name, data in entries + entries[-1:]:
            dst.writestr(name, data)
    rewrite(folder, weights=twice.getvalue())
    with pytest.raises(ValueError, match="names an entry twice"):
        Detector.load(folder)
    rewrite(folder, weights=good.getvalue())
    assert Detector.load(folder).model.name == "mnist"  # the honest state dict loads, no trust needed


def test_a_pinned_bundle_refuses_a_swapped_one(tmp_path):
    """The digests inside detector.json are the author's: whoever swaps the bundle rewrites them too. The pin is
    the deployment's own."""
    folder = copy_shipped(tmp_path)
    pin = bundle_digest(folder)
    assert Detector.load(folder, digest=pin).model.name == "mnist"
    assert split_pin(f"{folder}@{pin}") == (str(folder), pin)
    calibration = json.loads((folder / "calibration.json").read_text())
    rewrite(folder, {**calibration, "threshold": 1e9})  # the swap: a detector that never flags
    with pytest.raises(PermissionError, match="not the sha256:.* this deployment pins"):
        Detector.load(folder, digest=pin)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Detector.load(folder, digest="sha256:abc")


def test_the_cli_prints_the_pin_and_detect_honours_it(tmp_path, digits):
    from worker.cli import app

    folder = copy_shipped(tmp_path)
    cv2.imwrite(str(tmp_path / "d.png"), digits.images[0])
    done = CliRunner().invoke(app, ["digest", str(folder)])
    assert done.exit_code == 0 and done.output.strip() == bundle_digest(folder)
    pinned = f"{folder}@{done.output.strip()}"
    assert CliRunner().invoke(app, ["detect", "--detector", pinned, "--json", str(tmp_path / "d.png")]).exit_code == 0
    wrong = f"{folder}@sha256:{'0' * 64}"
    done = CliRunner().invoke(app, ["detect", "--detector", wrong, "--json", str(tmp_path / "d.png")])
    assert done.exit_code == 2 and "pins" in done.output


def test_a_state_dict_whose_pickle_builds_millions_of_objects_is_refused(tmp_path):
    """A pickle of 4 MB of one-byte `}` opcodes (4 million empty dicts, +309 MiB in 2.8 s) inside a state dict
    the size bound admits: its pickle is bounded by what the network's names and tensors need."""
    import io

    folder = copy_shipped(tmp_path)
    good = io.BytesIO()
    torch.save(MnistNet().state_dict(), good)
    bomb = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02}(X\x01\x00\x00\x00w](" + b"}" * 400_000 + b"eu."
            dst.writestr(info.filename, data)
    rewrite(folder, weights=bomb.getvalue())
    with pytest.raises(ValueError, match="its pickle is over"):
        Detector.load(folder)
