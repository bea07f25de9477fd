"""The shipped MNIST detector's verdicts stay what they were when the fixture was recorded
(``scripts/record_verdict_fixture.py``: 300 shipped clean digits and 300 shipped adversarial ones).

Classes and verdicts must match exactly. Scores and signals must match to float32 rounding: on the machine that
recorded the fixture they match bit for bit, and another CPU's kernels may sum in another order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import load_adversarial_digits, load_sample_digits

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mnist_verdicts.npz"


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURE) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def now(detector):
    images = np.concatenate([load_sample_digits().images[:300], load_adversarial_digits().images[:300]])
    return detector.detect(images)


def test_classes_and_verdicts_are_unchanged(recorded, now):
    for name in ("predicted_class", "denoised_class", "is_adversarial"):
        np.testing.assert_array_equal(getattr(now, name), recorded[name], err_msg=name)
    assert now.threshold == recorded["threshold"]
    assert recorded["is_adversarial"][300:].all() and recorded["is_adversarial"][:300].mean() < 0.1


def test_scores_and_signals_are_unchanged(recorded, now):
    np.testing.assert_allclose(now.score, recorded["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(now.confidence, recorded["confidence"], rtol=1e-6, atol=1e-7)
    signals = {k.removeprefix("signal_") for k in recorded if k.startswith("signal_")}
    assert signals == set(now.signals)
    for name in signals:
        np.testing.assert_allclose(now.signals[name], recorded[f"signal_{name}"], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
