"""The signal registry and the config that names signals: one definition per signal, clear errors for unknown
names or parameters, a config that survives its dict, and every shipped calibration file still loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import PRESETS, SIGNALS, Calibration, Detector, DetectorConfig, load_model, preset
from pipeline.calibration import CALIBRATION_VERSION
from pipeline.config import CONFIG_VERSION
from pipeline.signals import MedianParams, TransplantParams, register

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CALIBRATIONS = [*sorted((ROOT / "pipeline" / "assets" / "detectors").glob("*/calibration.json")),
                        *sorted((ROOT / "reports").glob("*/calibration.json"))]


def test_every_signal_says_its_tail_and_stage_and_the_base_ones_need_no_model():
    assert {s.tails for s in SIGNALS.values()} <= {"upper", "two-sided"}
    base = {name for name, s in SIGNALS.items() if s.stage == "maps"}
    assert base == {"entropy_original", "entropy_denoised", "entropy_change", "prediction_shift", "map_shift"}
    assert SIGNALS["activation_norm"].hook is not None


def test_a_config_names_its_signals_with_their_parameters():
    config = DetectorConfig(signals={"prediction_shift": {}, "median_shift": {"size": 3}})
    assert config.params("median_shift") == MedianParams(size=3) and config.params("prediction_shift") is None
    assert config.model_signals() == ["median_shift"]
    assert DetectorConfig(signals=("transplant_gain",)).params("transplant_gain") == TransplantParams()


def test_unknown_signals_and_parameters_are_errors_that_name_them():
    with pytest.raises(ValueError, match="unknown signal 'median'.*prediction_shift"):
        DetectorConfig(signals=("median",))
    with pytest.raises(ValueError, match="map_shift.*takes no parameters"):
        DetectorConfig(signals={"map_shift": {"size": 2}})
    with pytest.raises(ValueError, match="at least one signal"):
        DetectorConfig(signals=())
    with pytest.raises(ValueError, match="unknown detector config keys: medain"):
        DetectorConfig.from_dict({"version": CONFIG_VERSION, "medain": 2})
    with pytest.raises(ValueError, match="newer than this explainer reads"):
        DetectorConfig.from_dict({"version": CONFIG_VERSION + 1})


def test_the_defaults_are_neutral_and_the_presets_are_named():
    plain = DetectorConfig()
    assert list(plain.signals) == ["prediction_shift", "map_shift"] and plain.nlm.h == 3.0  # OpenCV's own
    assert set(PRESETS) == {"digits", "photos"}
    assert preset("digits").params("median_shift").size == 2
    assert preset("photos").params("transplant_gain") == TransplantParams(fraction=0.15, hosts=8)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("mnist")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_config_survives_its_dict(name):
    config = preset(name)
    assert DetectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("path", SHIPPED_CALIBRATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_calibration_loads_with_the_config_it_was_made_with(path, tmp_path):
    raw = json.loads(path.read_text())
    cal = Calibration.load(path)
    config = DetectorConfig.from_dict(cal.config)
    assert list(cal.signals) == list(config.signals)  # the score's signals are the config's
    assert config.nlm.h == raw["config"]["nlm"]["h"] and config.method == raw["config"]["method"]
    if raw.get("version", 1) == 1:  # one knob per check
        for knob, signal, field in (("median", "median_shift", "size"), ("occlusion", "occlusion_shift", "fraction"),
                                    ("transplant", "transplant_gain", "fraction")):
            if signal in config.signals:
                assert getattr(config.params(signal), field) == raw["config"][knob]
    else:
        assert config.to_dict()["signals"] == raw["config"]["signals"]
    cal.save(tmp_path / "again.json")  # written as the current version, read back the same
    again = Calibration.load(tmp_path / "again.json")
    assert again == cal and json.loads((tmp_path / "again.json").read_text())["version"] == CALIBRATION_VERSION


def test_a_registered_signal_is_measured_scored_and_carried_without_touching_the_detector(digits):
    """Adding a signal is its registration (one function in pipeline/signals.py, or any module that registers)
    plus the preset that names it: the detector measures and scores it, the calibration keeps its tail, and the
    harness's reports and bench floor pick it up from the registry with no list to edit."""
    from evaluation.report import signal_names
    from evaluation.throughput import inference_passes_per_image

    @register("test_mean_probability", tails="upper", stage="model", passes=1)
    def _mean_probability(batch, params):
        """The originals' largest softmax output (a toy signal for this test)."""
        return batch.original_probs.max(1).astype(np.float64)

    try:
        det = Detector(load_model("mnist"), DetectorConfig(signals=("map_shift", "test_mean_probability")))
        cal = det.calibrate(digits.images[:100], 0.1)
        assert cal.signals["test_mean_probability"].tails == "upper"
        res = det.detect(digits.images[100:110])
        np.testing.assert_allclose(res.signals["test_mean_probability"], res.confidence)
        assert inference_passes_per_image(det) == 1
        metrics = {"attacks": {"pgd": {"signal_roc_auc": {"test_mean_probability": 0.5, "map_shift": 0.9}}}}
        assert signal_names(metrics) == ["map_shift", "test_mean_probability"]
    finally:
        del SIGNALS["test_mean_probability"]


def test_noise_shift_is_the_same_for_an_image_whatever_its_batch_and_grows_with_the_noise(digits):
    """One fixed noise draw per copy, added to every image alike: an image's value does not depend on its
    batch-mates (the stream batches differently from a call in process)."""
    config = DetectorConfig(signals={"map_shift": {}, "noise_shift": {"sigma": 0.1, "copies": 3}})
    det = Detector(load_model("mnist"), config)
    alone = det.analyse(digits.images[:4])["noise_shift"]
    together = det.analyse(digits.images[:12])["noise_shift"][:4]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    louder = Detector(load_model("mnist"), DetectorConfig(signals={"noise_shift": {"sigma": 0.5, "copies": 3}}))
    assert louder.analyse(digits.images[:12])["noise_shift"].mean() > det.analyse(digits.images[:12])[
        "noise_shift"].mean()
    assert SIGNALS["noise_shift"].forward_passes({"copies": 3}) == 3
