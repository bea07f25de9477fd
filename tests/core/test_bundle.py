"""Detector bundles and the model sources behind them: each supported kind saves and loads back to the same
verdicts, refused formats say why and what to give instead, a tampered or newer bundle is refused, and an
uncalibrated detector never decides with a rule nobody asked for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Detector, preset
from pipeline.models import load_network, parse_model_ref
from pipeline.models.imagenet import SHARED_WEIGHTS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tiny_resnet():
    sys.path.insert(0, str(FIXTURES))
    try:
        import tiny_resnet
    finally:
        sys.path.remove(str(FIXTURES))
    return tiny_resnet


@pytest.fixture(scope="module")
def net(tiny_resnet):
    torch.manual_seed(0)
    return tiny_resnet.build().eval()  # untrained: a bundle must give back exactly these numbers


@pytest.fixture(scope="module")
def calibrated(net, digits):
    det = Detector.from_model(net, input_size=28, channels=1, name="tiny", factory="tiny_resnet:build")
    det.calibrate(digits.parity("even").images[:200], 0.05)
    return det


def test_a_factory_bundle_loads_back_to_the_same_verdicts(calibrated, digits, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    calibrated.save(tmp_path / "tiny")
    manifest = json.loads((tmp_path / "tiny" / "detector.json").read_text())
    assert manifest["format"] == "explainer-detector" and manifest["version"] == 1 and manifest["name"] == "tiny"
    assert manifest["model"]["source"]["kind"] == "factory" and manifest["model"]["source"]["factory"] == \
        "tiny_resnet:build"
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["calibration.json", "detector.json",
                                                                      "weights.pt"]
    images = digits.parity("odd").images[:64]
    with pytest.raises(PermissionError, match="calling 'tiny_resnet:build'.*trust_code=True"):
        Detector.load(tmp_path / "tiny")  # a bundle that names code to run loads only when trusted
    again = Detector.load(tmp_path / "tiny", trust_code=True)
    assert again.config == calibrated.config and again.calibration == calibrated.calibration
    a, b = calibrated.detect(images), again.detect(images)
    assert np.array_equal(a.score, b.score) and np.array_equal(a.is_adversarial, b.is_adversarial)


def test_exported_and_torchscript_networks_save_themselves(net, calibrated, digits, tmp_path):
    images = digits.parity("odd").images[:32]
    expected = calibrated.detect(images).score
    program = torch.export.export(net, (torch.zeros(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    with pytest.warns(FutureWarning):  # PyTorch deprecates TorchScript; it still loads the models made with it
        scripted = torch.jit.script(net)
    for name, given in (("exported", program), ("scripted", scripted)):
        det = Detector.from_model(given, input_size=28, channels=1, name=name)
        det.calibration = calibrated.calibration
        det.save(tmp_path / name)
        with pytest.raises(PermissionError, match="runs code its author wrote.*trust_code=True"):
            Detector.load(tmp_path / name)  # a compiled network is code: only a trusted bundle loads
        again = Detector.load(tmp_path / name, trust_code=True)
        assert again.model.source.kind == ("exported" if name == "exported" else "torchscript")
        assert np.allclose(again.detect(images).score, expected, atol=1e-5), name
    assert parse_model_ref(str(tmp_path / "exported" / "model.pt2")).kind == "exported"
    assert parse_model_ref(str(tmp_path / "scripted" / "model.ts")).kind == "torchscript"


def test_refused_model_formats_say_why_and_what_to_give(net, tmp_path):
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="pickled Python object.*run code.*state_dict"):
        parse_model_ref(str(tmp_path / "whole.pt"))
    torch.save(net.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="no architecture.*module:callable"):
        parse_model_ref(str(tmp_path / "state.pt"))
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="ONNX.*gradients.*torch.export"):
        parse_model_ref(str(tmp_path / "m.onnx"))
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        parse_model_ref(str(tmp_path / "absent.pt2"))
    with pytest.raises(ValueError, match="cannot import 'no_such_module'.*PYTHONPATH"):
        load_network(parse_model_ref("no_such_module:build"))


def test_an_exported_archive_that_would_unpickle_is_refused(net, tmp_path):
    """torch.export.load retries sample inputs with weights_only=False, which runs code from the file: an
    archive whose sample inputs are not plain tensors is refused before it is loaded."""
    import io
    import zipfile

    program = torch.export.export(net, (torch.zeros(2, 1, 28, 28),))
    torch.export.save(program, tmp_path / "clean.pt2")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    with zipfile.ZipFile(tmp_path / "clean.pt2") as src, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, buffer.getvalue() if "/data/sample_inputs/" in item.filename else data)
    load_network(parse_model_ref(str(tmp_path / "clean.pt2")))
    with pytest.raises(ValueError, match="sample inputs are not plain tensors"):
        load_network(parse_model_ref(str(tmp_path / "evil.pt2")))


def test_a_built_in_model_keeps_the_weights_it_was_calibrated_with(digits, tmp_path):
    from pipeline.models.mnist import MNIST_WEIGHTS

    state = torch.load(MNIST_WEIGHTS, weights_only=True)
    torch.save({k: v * 0.5 if k.endswith("weight") else v for k, v in state.items()}, tmp_path / "mine.pt")
    det = Detector.from_pretrained("mnist", weights=tmp_path / "mine.pt")
    det.save(tmp_path / "b")
    again = Detector.load(tmp_path / "b")
    for a, b in zip(again.model.net.state_dict().values(), det.model.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_network_without_hooks_refuses_hooked_methods_with_the_fix(net):
    program = torch.export.export(net, (torch.zeros(2, 1, 28, 28),))
    with pytest.raises(ValueError, match="gradcam.*activation_norm.*--method saliency --signals"):
        Detector.from_model(program, input_size=28, channels=1, preset="photos")
    det = Detector.from_model(program, input_size=28, channels=1, preset="digits")  # saliency: gradients only
    assert det.config.method == "saliency"
    with pytest.raises(ValueError, match="explain_layer.*fire no hooks"):
        Detector.from_model(program, input_size=28, channels=1, preset="digits", explain_layer="conv")


def test_a_plain_module_needs_a_factory_to_be_saved(net, tmp_path):
    det = Detector.from_model(net, input_size=28, channels=1)
    with pytest.raises(ValueError, match="factory='package.module:callable'"):
        det.save(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_tampered_newer_and_foreign_folders_are_refused(calibrated, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    folder = calibrated.save(tmp_path / "tiny")
    weights = folder / "weights.pt"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the digest"):
        Detector.load(folder, trust_code=True)
    weights.write_bytes(original)
    manifest = json.loads((folder / "detector.json").read_text())
    for broken, message in (
        ({**manifest["model"]["source"], "sha256": None}, "needs its name and its sha256"),
        ({**manifest["model"]["source"], "weights": "../../etc/passwd"}, "outside the bundle"),
    ):
        (folder / "detector.json").write_text(json.dumps({**manifest, "model": {**manifest["model"],
                                                                                  "source": broken}}))
        with pytest.raises(ValueError, match=message):
            Detector.load(folder, trust_code=True)
    escaping = {**manifest, "calibration": {"file": "../elsewhere.json", "sha256": "0" * 64}}
    (folder / "detector.json").write_text(json.dumps(escaping))
    with pytest.raises(ValueError, match="outside the bundle"):
        Detector.load(folder, trust_code=True)
    (folder / "detector.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99 is newer"):
        Detector.load(folder, trust_code=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a detector bundle"):
        calibrated.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="not a detector bundle"):
        Detector.load(tmp_path / "mine")


def test_an_uncalibrated_detector_uses_the_sign_rule_only_by_name(net, digits):
    det = Detector.from_model(net, input_size=28, channels=1, preset=preset("digits"))
    with pytest.raises(ValueError, match="no calibration.*explainer calibrate.*rule='sign'"):
        det.detect(digits.images[:4])
    assert det.detect(digits.images[:4], rule="sign").rule == "sign"


@pytest.mark.skipif(not SHARED_WEIGHTS["mobilenet_v2"].exists(), reason="needs ../shared/models (MobileNetV2)")
def test_the_shipped_photo_detector_loads_with_the_shared_weights():
    det = Detector.from_pretrained("mobilenet_v2", weights=SHARED_WEIGHTS["mobilenet_v2"])
    assert det.calibration is not None and det.config.method == "gradcam"
    assert det.hosts is not None and len(det.hosts) == det.config.params("transplant_gain").hosts
    reference = json.loads((Path(__file__).resolve().parents[2] / "reports" / "imagenet" / "calibration.json")
                           .read_text())
    assert det.calibration.threshold == reference["threshold"]


def test_a_calibration_from_a_bundle_cannot_smuggle_a_decoder_bomb_as_a_host():
    """The transplant's hosts travel base64-PNG inside calibration.json: each is checked before it is decoded."""
    import base64
    import struct
    import zlib

    from pipeline.transplant import decode_hosts, encode_hosts

    hosts = np.zeros((2, 28, 28, 1), np.uint8)
    assert np.array_equal(decode_hosts(encode_hosts(hosts), (28, 28, 1)), hosts)
    png = base64.b64decode(encode_hosts(hosts[:1])[0])
    body = b"Comment\0xxxx"
    bomb = png[:33] + struct.pack(">I", 2**31 - 1) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body)) \
        + png[png.index(b"IEND") - 4 :]
    with pytest.raises(ValueError, match="declares 2147483647 bytes"):
        decode_hosts([base64.b64encode(bomb).decode()], (28, 28, 1))
    huge = png[:16] + struct.pack(">II", 50_000, 50_000) + png[24:]
    with pytest.raises(ValueError, match="50000×50000 PNG"):
        decode_hosts([base64.b64encode(huge).decode()], (28, 28, 1))
