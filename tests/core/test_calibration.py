"""The calibrated score's threshold: split in halves (the default) or cross-fitted over K folds.

These check statistical properties, so they draw clean "signals" from known distributions (many draws are
needed, and a distribution whose true tail is known is what makes the FPR measurable); the detector's real
signals on real digits are covered in test_detector.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import Calibration, fit_calibration

SIGNALS = ("prediction_shift", "map_shift", "median_shift")


def _draw(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"prediction_shift": rng.exponential(1.0, n), "map_shift": rng.gamma(3.0, 1.0, n),
            "median_shift": rng.lognormal(0.0, 0.5, n)}


def _fit(signals, folds):
    return fit_calibration(signals, 0.05, model="m", method="saliency", entropy="spatial", images="", use=SIGNALS,
                           folds=folds)


def test_cross_fitting_keeps_the_target_and_strays_less_than_halves():
    """200 clean images per calibration, 300 calibrations, each judged on 4,000 fresh clean images: both
    procedures are unbiased for the 5% target, and the cross-fitted one's FPR scatters less (every image sets
    the threshold and the CDFs, instead of half of them each)."""
    rng = np.random.default_rng(0)
    fresh = _draw(rng, 4000)
    fpr = {None: [], 5: []}
    for _ in range(300):
        cal = _draw(rng, 200)
        for folds in fpr:
            c = _fit(cal, folds)
            fpr[folds].append(np.mean(c.score(fresh) > c.threshold))
    halves, cross = np.asarray(fpr[None]), np.asarray(fpr[5])
    assert 0.03 < halves.mean() < 0.065 and 0.03 < cross.mean() < 0.065  # measured: 4.2% and 4.5%
    assert cross.std() < 0.85 * halves.std()  # measured: 1.5 against 2.2 points


def test_cross_fitted_calibration_uses_every_image_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    c = _fit(_draw(rng, 300), 5)
    assert c.folds == 5 and c.n_reference == c.n_threshold == 300
    assert 0.0 < c.threshold_fpr <= 0.05 + 1e-9
    c.save(tmp_path / "cal.json")
    back = Calibration.load(tmp_path / "cal.json")
    assert back.folds == 5 and back.threshold == c.threshold
    halves = _fit(_draw(rng, 300), None)
    assert halves.folds is None and halves.n_reference == halves.n_threshold == 150


@pytest.mark.parametrize("folds", [1, 31])
def test_folds_outside_two_to_n_over_ten_are_refused(folds):
    with pytest.raises(ValueError, match="folds must be between 2 and n/10"):
        _fit(_draw(np.random.default_rng(2), 300), folds)


def test_threshold_is_the_conformal_quantile_of_the_held_out_scores():
    """m held-out clean scores: the threshold is the ⌈0.95 (m + 1)⌉-th smallest, so a new clean image (exchangeable
    with them) exceeds it with probability ≤ 5%. At m = 63 that is the 61st, which leaves 2 held-out scores above
    it (expected FPR 3/64 = 4.7%); numpy's "higher" 95% quantile, the 60th, left 3 (4/64 = 6.25%)."""
    c = _fit(_draw(np.random.default_rng(3), 126), None)
    assert c.n_threshold == 63
    assert round(c.threshold_fpr * 63) == 63 - int(np.ceil(0.95 * 64)) == 2


def test_folds_with_confidence_is_refused():
    signals = _draw(np.random.default_rng(4), 300)
    with pytest.raises(ValueError, match="confidence needs the split in halves"):
        fit_calibration(signals, 0.05, model="m", method="saliency", entropy="spatial", images="", use=SIGNALS,
                        folds=5, confidence=0.95)
