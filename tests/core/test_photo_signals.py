"""The photo signals: feature_distance (a Gaussian fitted on clean images' pooled features, cross-fitted at
calibration and kept in it) and chroma_residual (colour noise in the flattest blocks)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import Calibration, Detector, DetectorConfig, load_model
from pipeline.calibration import fit_calibration, fit_signals
from pipeline.inputs import read_image_file
from pipeline.signals import SIGNALS, ChromaParams, FeatureParams, fit_gaussian, gaussian_distance

SHARED_PHOTO = next(iter(sorted((__import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                 / "imagenet-sample" / "images").glob("*.JPEG"))), None)


def test_gaussian_distance_is_the_mahalanobis_distance_in_the_principal_axes():
    rng = np.random.default_rng(0)
    scale = np.array([5.0, 2.0, 0.5, 0.1])
    clean = rng.normal(size=(4000, 4)) * scale
    state = fit_gaussian(clean, FeatureParams(components=4))
    probe = np.array([[5.0, 0, 0, 0], [0, 0, 0, 0.1], [0, 0, 0, 0]])
    np.testing.assert_allclose(gaussian_distance(probe, state), [1.0, 1.0, 0.0], atol=0.05)
    # fewer axes than dimensions: the distance in the top ones only
    top2 = fit_gaussian(clean, FeatureParams(components=2))
    assert len(top2["axes"]) == 2
    np.testing.assert_allclose(gaussian_distance([[0, 0, 0, 1.0]], top2), [0.0], atol=0.05)


def test_fitted_values_are_cross_fitted_and_the_kept_state_fitted_on_all():
    """Each image's value comes from a state fitted without its fold (as a new clean image's does, not as an
    image the state saw); the calibration keeps the state fitted on every image."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 8))
    config = DetectorConfig(signals={"feature_distance": {"components": 3}}).to_dict()
    values, fitted = fit_signals({"feature_distance": vectors}, ("feature_distance",), config, folds=3)
    rows = np.arange(60)
    for k in range(3):
        inside = rows % 3 == k
        expected = gaussian_distance(vectors[inside], fit_gaussian(vectors[~inside], FeatureParams(3)))
        np.testing.assert_allclose(values["feature_distance"][inside], expected)
    assert fitted["feature_distance"] == fit_gaussian(vectors, FeatureParams(3))
    in_sample = gaussian_distance(vectors, fitted["feature_distance"])
    assert not np.allclose(values["feature_distance"], in_sample)  # what the CDFs see is not in-sample
    with pytest.raises(ValueError, match="per-image vectors"):
        fit_calibration({"feature_distance": values["feature_distance"]}, 0.05, model="m", method="saliency",
                        entropy="spatial", images="", use=("feature_distance",), config=config)


def test_a_detector_fits_feature_distance_keeps_it_and_recalibrates(digits, tmp_path):
    """Calibrated on clean digits, a detector scores feature_distance as one value per image, farther for noise
    than for digits; the state travels in the bundle; a calibrated detector recalibrates from fresh vectors."""
    model = load_model("mnist")
    det = Detector(model, DetectorConfig(method="saliency", signals={"prediction_shift": {},
                                                                      "feature_distance": {"components": 16}}))
    uncalibrated = det.detect(digits.images[:4], rule="sign")
    assert "feature_distance" not in uncalibrated.signals  # vectors are never a verdict's signal
    cal = det.calibrate(digits.images[:300], 0.05, batch_size=100, folds=5)
    assert set(cal.fitted) == {"feature_distance"} and len(cal.fitted["feature_distance"]["axes"]) == 16
    noise = np.random.default_rng(2).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    clean = det.detect(digits.images[300:340])
    noisy = det.detect(noise)
    assert clean.signals["feature_distance"].shape == (40,)
    assert np.median(noisy.signals["feature_distance"]) > 3 * np.median(clean.signals["feature_distance"])
    assert noisy.is_adversarial.mean() > 0.9
    det.save(tmp_path / "bundle")
    back = Detector.load(tmp_path / "bundle")
    np.testing.assert_allclose(back.detect(noise).score, noisy.score)
    assert Calibration.load(tmp_path / "bundle" / "calibration.json").fitted.keys() == {"feature_distance"}
    again = det.calibrate(digits.images[:300], 0.05, batch_size=100, folds=5)
    assert again.fitted["feature_distance"] == cal.fitted["feature_distance"]


def _chroma(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return SIGNALS["chroma_residual"].compute(SimpleNamespace(both=x, n=len(x)), ChromaParams())


@pytest.mark.skipif(SHARED_PHOTO is None, reason="needs ../shared/data/imagenet-sample")
def test_chroma_residual_sees_noise_that_moves_each_channel_not_noise_shared_by_all():
    """A gradient attack moves each colour channel on its own; noise that moves all three alike (luma: a
    camera's grain) leaves the chroma planes as they were."""
    photo = load_model("mobilenet_v2", random_init=True).prepare(read_image_file(SHARED_PHOTO)[None])[0]
    signs = np.random.default_rng(3).choice([-2, 2], size=photo.shape)
    per_channel = np.clip(photo.astype(int) + signs, 0, 255).astype(np.uint8)
    shared = np.clip(photo.astype(int) + signs[..., :1], 0, 255).astype(np.uint8)
    clean, moved, grain = _chroma(np.stack([photo, per_channel, shared]))
    assert moved > clean + 5 and abs(grain - clean) < 1.0


def test_chroma_residual_refuses_grey_images():
    with pytest.raises(ValueError, match="colour"):
        SIGNALS["chroma_residual"].compute(SimpleNamespace(both=torch.zeros(2, 1, 28, 28), n=2), ChromaParams())
