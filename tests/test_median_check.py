"""The median check: the originals classified once more after Feature Squeezing's 2×2 median filter, turned into
the median_shift signal (the second denoiser, for CW-L0's few saturated pixels that NLM keeps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Detector, DetectorConfig, load_adversarial_digits, load_model
from pipeline.baselines.feature_squeezing import median_filter


def test_median_shift_is_the_l1_distance_to_the_median_filtered_prediction(digits):
    model = load_model("mnist")
    det = Detector(model, DetectorConfig(median=2))
    images = digits.images[:32]
    s = det.analyse(images)
    x = torch.from_numpy(det.prepare(images))
    with torch.inference_mode():
        p = torch.softmax(model.net(x), 1)
        pm = torch.softmax(model.net(median_filter(x, 2)), 1)
    np.testing.assert_allclose(s["median_shift"], (p - pm).abs().sum(1).numpy(), atol=1e-4)
    off = DetectorConfig(median=0, signals=("prediction_shift", "map_shift"))
    assert "median_shift" not in Detector(model, off).analyse(images)


def test_a_score_on_median_shift_without_the_median_check_is_a_clear_error():
    with pytest.raises(ValueError, match="median is off"):
        DetectorConfig(median=0)


def test_a_calibration_saved_before_the_median_check_loads_as_it_was_made():
    legacy = {"method": "saliency", "nlm": {"h": 50.0}, "occlusion": 0.0}
    config = DetectorConfig.from_dict(legacy)
    assert config.median == 0 and config.signals == ("prediction_shift", "map_shift")


def test_a_calibrated_median_check_travels_with_the_config_and_splits_with_the_batch(digits):
    config = DetectorConfig(median=2, signals=("prediction_shift", "map_shift", "median_shift"))
    det = Detector(load_model("mnist"), config)
    cal = det.calibrate(digits.images[:200], 0.05)
    assert cal.signals["median_shift"].tails == "upper"
    assert DetectorConfig.from_dict(cal.config) == config
    res = det.detect(digits.images[200:216])
    assert res.median_shift is not None and "median_shift" in res.rows()[0]
    x = det.prepare(digits.images[200:216])
    whole, sub = det.explain_pair(x, det.denoise(x)), det.explain_pair(x[4:9], det.denoise(x[4:9]))
    np.testing.assert_allclose(whole.part(4, 9).median_probs, sub.median_probs, atol=1e-5)


def test_the_median_undoes_cw_l0_more_than_clean_digits(digits):
    """What the signal is for: CW-L0 digits move far more under the median than clean digits do."""
    det = Detector(load_model("mnist"), DetectorConfig(median=2))
    adv = load_adversarial_digits()
    l0 = adv.images[np.asarray(adv.attacks) == "cw-l0"]
    assert len(l0) >= 10
    clean = det.analyse(digits.images[:200])["median_shift"]
    attacked = det.analyse(l0)["median_shift"]
    assert np.median(attacked) > np.quantile(clean, 0.9)


def test_concat_is_the_inverse_of_part(digits):
    """What the Serve Explainer relies on when it splits a request above its max_batch_size."""
    from pipeline.detector import Explained

    det = Detector(load_model("mnist"), DetectorConfig(median=2))
    x = det.prepare(digits.images[:10])
    whole = det.explain_pair(x, det.denoise(x))
    joined = Explained.concat([whole.part(0, 3), whole.part(3, 4), whole.part(4, 10)])
    for name in ("probs", "maps", "median_probs"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
    assert joined.occluded_probs is None


def test_cli_calibrate_can_turn_the_median_check_off(tmp_path):
    import json

    from typer.testing import CliRunner

    from worker.cli import app

    out = tmp_path / "cal.json"
    args = ["calibrate", "--model", "mnist", "--median", "0", "--n", "100", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads(out.read_text())["config"]
    assert config["median"] == 0 and config["signals"] == ["prediction_shift", "map_shift"]
