"""The transplant check (SentiNet's second half): hosts survive the calibration file exactly, the gain equals a
direct computation, the calibration keeps its hosts out of the fit, and a detector without hosts says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Detector, DetectorConfig, load_model
from pipeline.calibration import Calibration
from pipeline.occlude import top_relevance_masks
from pipeline.transplant import decode_hosts, encode_hosts, pick_hosts, transplant_gain


def _signals(fraction: float = 0.2, hosts: int = 4) -> dict:
    return {"prediction_shift": {}, "map_shift": {}, "transplant_gain": {"fraction": fraction, "hosts": hosts}}


@pytest.mark.parametrize("channels", [1, 3])
def test_hosts_survive_png_encoding_exactly(channels):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 17, 23, channels), dtype=np.uint8)
    np.testing.assert_array_equal(decode_hosts(encode_hosts(images), (17, 23, channels)), images)


def test_hosts_are_spread_and_fewer_than_the_images():
    assert pick_hosts(9, 3).tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match="hosts"):
        pick_hosts(5, 5)


def _direct_gain(net, x, maps, hosts, fraction):
    """One pasted image at a time, with numpy masks: what transplant_gain batches."""
    with torch.inference_mode():
        pred = torch.softmax(net(x), 1).argmax(1)
        host_probs = torch.softmax(net(hosts), 1)
    masks = top_relevance_masks(maps, fraction).astype(bool)
    out = []
    for i in range(len(x)):
        rises = []
        for j in range(len(hosts)):
            pasted = np.where(masks[i][None], x[i].numpy(), hosts[j].numpy())
            with torch.inference_mode():
                p = torch.softmax(net(torch.from_numpy(pasted)[None]), 1)[0]
            rises.append(float(p[pred[i]] - host_probs[j, pred[i]]))
        out.append(np.mean(rises))
    return np.array(out)


def test_gain_equals_a_direct_computation(digits):
    model = load_model("mnist")
    x = torch.from_numpy(digits.images[:5, None].astype(np.float32) / 255)
    hosts = torch.from_numpy(digits.images[100:103, None].astype(np.float32) / 255)
    maps = np.random.default_rng(1).normal(size=(5, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        pred = torch.softmax(model.net(x), 1).argmax(1)
        host_probs = torch.softmax(model.net(hosts), 1)
    got = transplant_gain(model.net, x, pred, maps, hosts, host_probs, 0.2)
    np.testing.assert_allclose(got, _direct_gain(model.net, x, maps, hosts, 0.2), atol=1e-5)


def test_gain_on_colour_images_equals_a_direct_computation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 14 * 14, 5)).eval()
    x, hosts = torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16)
    maps = np.random.default_rng(3).normal(size=(3, 1, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        pred = torch.softmax(net(x), 1).argmax(1)
        host_probs = torch.softmax(net(hosts), 1)
    got = transplant_gain(net, x, pred, maps, hosts, host_probs, 0.3)
    np.testing.assert_allclose(got, _direct_gain(net, x, maps, hosts, 0.3), atol=1e-6)


def test_the_detector_pastes_the_originals_relevant_region_with_the_originals_class(digits):
    """The detector's gain is the direct computation on the prepared originals, their own maps and classes (not
    the second half's, which shares the batch)."""
    config = DetectorConfig(signals=_signals(hosts=3))
    det = Detector(load_model("mnist"), config)
    det.use_hosts(digits.images[300:303])
    x = det.prepare(digits.images[:6])
    other = det.prepare(digits.images[6:12])  # in the copies' place: other digits, of other classes
    explained = det.explain_pair(x, other)
    assert (explained.probs[:6].argmax(1) != explained.probs[6:].argmax(1)).any()
    hosts = torch.from_numpy(det.prepare(digits.images[300:303]))
    expected = _direct_gain(det.model.net, torch.from_numpy(x), explained.maps[:6], hosts, 0.2)
    np.testing.assert_allclose(explained.signals["transplant_gain"], expected, atol=1e-5)
    again = type(explained).concat([explained.part(0, 2), explained.part(2, 6)])
    np.testing.assert_array_equal(again.signals["transplant_gain"], explained.signals["transplant_gain"])


def test_pasting_a_host_onto_itself_gains_nothing_and_a_whole_digit_gains_much(digits):
    model = load_model("mnist")
    host = torch.from_numpy(digits.images[7:8, None].astype(np.float32) / 255)
    maps = np.random.default_rng(2).normal(size=(1, 1, 28, 28)).astype(np.float32)
    with torch.inference_mode():
        probs = torch.softmax(model.net(host), 1)
    assert transplant_gain(model.net, host, probs.argmax(1), maps, host, probs, 0.5)[0] == pytest.approx(0, abs=1e-6)
    # another digit's pixels almost everywhere: the host turns into that digit
    other = next(i for i in range(len(digits.images)) if digits.labels[i] != digits.labels[7])
    x = torch.from_numpy(digits.images[other : other + 1, None].astype(np.float32) / 255)
    with torch.inference_mode():
        pred = torch.softmax(model.net(x), 1).argmax(1)
    assert transplant_gain(model.net, x, pred, maps, host, probs, 0.99)[0] > 0.5


def test_calibration_keeps_its_hosts_out_and_a_saved_detector_scores_the_same(digits, tmp_path):
    config = DetectorConfig(signals=_signals(hosts=4))
    det = Detector(load_model("mnist"), config)
    cal = det.calibrate(digits.images[:120], 0.05, folds=5)
    assert cal.n_reference == 116 and len(cal.hosts) == 4
    np.testing.assert_array_equal(det.hosts[..., 0], digits.images[pick_hosts(120, 4)])
    assert "4 of them kept out" in cal.images
    assert DetectorConfig.from_dict(cal.config) == config
    res = det.detect(digits.images[200:216])
    assert "transplant_gain" in res.signals and "transplant_gain" in res.rows()[0]
    cal.save(tmp_path / "cal.json")
    again = Detector(det.model, config, Calibration.load(tmp_path / "cal.json")).detect(digits.images[200:216])
    np.testing.assert_allclose(again.score, res.score)
    # the batch's parts carry the signal (the Serve Explainer splits merged batches)
    x = det.prepare(digits.images[200:216])
    whole = det.explain_pair(x, det.denoise(x))
    sub = det.explain_pair(x[3:9], det.denoise(x[3:9]))
    np.testing.assert_allclose(whole.part(3, 9).signals["transplant_gain"], sub.signals["transplant_gain"], atol=1e-5)


def test_a_list_of_images_calibrates_as_an_array_does(digits):
    """Photos of several sizes come as a list (explainer calibrate --images-dir): the hosts are picked from it."""
    config = DetectorConfig(signals=_signals(hosts=4))
    arr = Detector(load_model("mnist"), config)
    lst = Detector(arr.model, config)
    a, b = arr.calibrate(digits.images[:60], 0.05), lst.calibrate(list(digits.images[:60]), 0.05)
    np.testing.assert_array_equal(lst.hosts, arr.hosts)
    assert a.hosts == b.hosts and a.threshold == b.threshold and b.n_reference + b.n_threshold == 56


def test_without_hosts_the_sign_rule_skips_the_check_and_the_calibrated_rule_says_how_to_get_them(digits):
    config = DetectorConfig(signals=_signals(hosts=4))
    det = Detector(load_model("mnist"), config)
    res = det.detect(digits.images[:4], rule="sign")  # an uncalibrated detector: the paper's rule, no hosts
    assert "transplant_gain" not in res.signals
    cal = det.calibrate(digits.images[:60], 0.05)
    cal.hosts = []  # a calibration file whose hosts were lost
    with pytest.raises(ValueError, match="transplant_gain.*calibrate with the transplant on"):
        Detector(det.model, config, cal).detect(digits.images[:4])


def test_a_bad_fraction_or_host_count_is_a_clear_error():
    for fraction, hosts in ((1.5, 8), (0.2, 0)):
        with pytest.raises(ValueError, match="transplant_gain pastes a fraction"):
            DetectorConfig(signals=_signals(fraction, hosts))


def test_a_failed_calibration_leaves_the_detector_as_it_was_and_names_the_hosts(digits):
    config = DetectorConfig(signals=_signals(hosts=4))
    det = Detector(load_model("mnist"), config)
    cal = det.calibrate(digits.images[:60], 0.05)
    hosts = det.hosts.copy()
    with pytest.raises(ValueError, match="at least 20") as err:
        det.calibrate(digits.images[100:122], 0.05)  # 18 left once 4 become hosts
    assert "kept out as the transplant's hosts" in str(err.value.__notes__)
    assert det.calibration is cal
    np.testing.assert_array_equal(det.hosts, hosts)
