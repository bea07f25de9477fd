"""The adaptive attack: BPDA's forward is the detector's own NLM, the attack stays in its budget, and knowing the
detector lowers the detector's score (what makes it adaptive); the sweep keeps each image's lowest score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.adaptive import adaptive_sweep, scaled
from evaluation.attacks import PGD, AdaptivePGD
from evaluation.attacks.adaptive import bpda_nlm
from evaluation.datasets import load_test_digits
from evaluation.metrics import to_tensor, to_uint8
from pipeline import Detector, denoise_batch


@pytest.fixture(scope="module")
def detector():
    return Detector.from_pretrained("mnist")


@pytest.fixture(scope="module")
def few():
    return load_test_digits().parity("even").spread(16)


def test_bpda_forward_is_the_detectors_nlm(detector, few):
    x = to_tensor(few.images)
    expected = denoise_batch(few.images[..., None], detector.config.nlm)[..., 0]
    np.testing.assert_array_equal(to_uint8(bpda_nlm(x, detector.config.nlm), few.images), expected)


def test_knowing_the_detector_lowers_its_score_within_the_budget(detector, few):
    x, y = to_tensor(few.images), torch.from_numpy(few.labels)
    torch.manual_seed(0)
    plain = to_uint8(PGD(eps=0.3, alpha=0.02, steps=20)(detector.model.net, x, y), few.images)
    torch.manual_seed(0)
    adaptive = to_uint8(AdaptivePGD(steps=20, alpha=0.02)(detector.model.net, x, y), few.images)
    assert np.abs(adaptive.astype(int) - few.images.astype(int)).max() <= round(0.3 * 255)
    fooled = detector.model(to_tensor(adaptive)).argmax(1).numpy() != few.labels
    assert fooled.mean() >= 0.75
    score = detector.calibration.score
    assert np.median(score(detector.analyse(adaptive[fooled]))) < 0.5 * np.median(score(detector.analyse(plain)))


def test_the_sweep_keeps_each_images_lowest_score(detector, few):
    base = AdaptivePGD(steps=10, alpha=0.03)
    run = adaptive_sweep(detector, few.images[:8], few.labels[:8], scales=(0.1, 10.0), attack=base,
                         log=lambda _: None)
    assert scaled(base, 10.0).map_weight == 10 * base.map_weight
    assert sum(run.params["kept_from_scale"].values()) == len(run.images) > 0
    assert run.params["linf_max"] <= 0.3 + 1e-9
    kept = detector.calibration.score(detector.analyse(run.images))
    # a scale that fooled every digit offered a candidate for each: the per-image minimum is at most its scores
    complete = [s["median_score"] for s in run.params["per_scale"].values() if s["success_rate"] == 1.0]
    assert complete and np.median(kept) <= min(complete) + 1e-6
