"""The median check: the originals classified once more after Feature Squeezing's 2×2 median filter, turned into
the median_shift signal (the second denoiser, for CW-L0's few saturated pixels that NLM keeps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import Detector, DetectorConfig, load_adversarial_digits, load_model, preset
from pipeline.filters import median_filter


def test_median_shift_is_the_l1_distance_to_the_median_filtered_prediction(digits):
    model = load_model("mnist")
    det = Detector(model, preset("digits"))
    images = digits.images[:32]
    s = det.analyse(images)
    x = torch.from_numpy(det.prepare(images))
    with torch.inference_mode():
        p = torch.softmax(model.net(x), 1)
        pm = torch.softmax(model.net(median_filter(x, 2)), 1)
    np.testing.assert_allclose(s["median_shift"], (p - pm).abs().sum(1).numpy(), atol=1e-4)
    off = DetectorConfig(signals=("prediction_shift", "map_shift"))
    assert "median_shift" not in Detector(model, off).analyse(images)


def test_bad_median_parameters_are_a_clear_error():
    with pytest.raises(ValueError, match="size must be an integer >= 2"):
        DetectorConfig(signals={"median_shift": {"size": 1}})
    with pytest.raises(ValueError, match="median_shift"):
        DetectorConfig(signals={"median_shift": {"side": 2}})


def test_a_calibration_saved_before_the_median_check_loads_as_it_was_made():
    legacy = {"method": "saliency", "nlm": {"h": 50.0}, "occlusion": 0.0}
    config = DetectorConfig.from_dict(legacy)
    assert dict(config.signals) == {"prediction_shift": None, "map_shift": None}
    assert (config.nlm.h, config.nlm.template, config.nlm.search) == (50.0, 3, 5)  # version 1's NLM defaults


def test_a_calibrated_median_check_travels_with_the_config_and_splits_with_the_batch(digits):
    config = DetectorConfig(signals={"prediction_shift": {}, "map_shift": {}, "median_shift": {"size": 2}})
    det = Detector(load_model("mnist"), config)
    cal = det.calibrate(digits.images[:200], 0.05)
    assert cal.signals["median_shift"].tails == "upper"
    assert DetectorConfig.from_dict(cal.config) == config
    res = det.detect(digits.images[200:216])
    assert "median_shift" in res.signals and "median_shift" in res.rows()[0]
    x = det.prepare(digits.images[200:216])
    whole, sub = det.explain_pair(x, det.denoise(x)), det.explain_pair(x[4:9], det.denoise(x[4:9]))
    np.testing.assert_allclose(whole.part(4, 9).signals["median_shift"], sub.signals["median_shift"], atol=1e-5)


def test_the_median_undoes_cw_l0_more_than_clean_digits(digits):
    """What the signal is for: CW-L0 digits move far more under the median than clean digits do."""
    det = Detector(load_model("mnist"), preset("digits"))
    adv = load_adversarial_digits()
    l0 = adv.images[np.asarray(adv.attacks) == "cw-l0"]
    assert len(l0) >= 10
    clean = det.analyse(digits.images[:200])["median_shift"]
    attacked = det.analyse(l0)["median_shift"]
    assert np.median(attacked) > np.quantile(clean, 0.9)


def test_concat_is_the_inverse_of_part(digits):
    """What the Serve Explainer relies on when it splits a request above its max_batch_size."""
    from pipeline.detector import Explained

    det = Detector(load_model("mnist"), preset("digits"))
    x = det.prepare(digits.images[:10])
    whole = det.explain_pair(x, det.denoise(x))
    joined = Explained.concat([whole.part(0, 3), whole.part(3, 4), whole.part(4, 10)])
    for name in ("probs", "maps"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
    assert set(joined.signals) == {"median_shift", "denoise_residual", "impulse_residual"}
    for name in joined.signals:
        np.testing.assert_array_equal(joined.signals[name], whole.signals[name])


def test_cli_calibrate_can_turn_the_median_check_off_and_set_a_signals_parameter(tmp_path):
    import json

    from typer.testing import CliRunner

    from worker.cli import app

    out = tmp_path / "cal.json"
    args = ["calibrate", "--model", "mnist", "--signals",
            "prediction_shift,map_shift,denoise_residual,impulse_residual", "--signal-param", "impulse_residual.top=7",
            "--n", "100", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads(out.read_text())["config"]
    assert config["signals"] == {"prediction_shift": {}, "map_shift": {}, "denoise_residual": {},
                                 "impulse_residual": {"size": 3, "top": 7}}
