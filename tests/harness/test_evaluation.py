"""The evaluation protocol's pieces, and a small end-to-end run of ``evaluate`` that writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluation.metrics import rate_ci95, roc_auc
from evaluation.mnist import evaluate_mnist


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    clean = np.round(rng.normal(0, 1, 300), 1)
    adv = np.round(rng.normal(0.7, 1, 200), 1)
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[clean, adv])
    assert roc_auc(clean, adv) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("hits,n", [(56, 1000), (3, 50), (0, 50), (50, 50), (250, 5000)])
def test_rate_ci95_is_the_wilson_interval(hits, n):
    """Wilson's interval is the set of rates p that the score test does not reject: the roots of
    (p̂ - p)² = z² p (1 - p) / n, found here numerically (scipy) instead of by the closed form."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    z, p_hat = norm.ppf(0.975), hits / n

    def gap(p: float) -> float:
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    # p̂ = 0 or 1 is a root itself, so the interval's other end is searched just past it
    lo = 0.0 if hits == 0 else brentq(gap, 1e-12, p_hat if hits < n else 1 - 1e-9)
    hi = 1.0 if hits == n else brentq(gap, p_hat if hits > 0 else 1e-9, 1 - 1e-12)
    assert rate_ci95(hits, n) == pytest.approx([lo, hi], abs=1e-6)


def test_rate_ci95_narrows_with_more_images():
    # five times the images at the same rate: about sqrt(5) = 2.24 times narrower
    ratio = np.diff(rate_ci95(56, 1000))[0] / np.diff(rate_ci95(280, 5000))[0]
    assert 2.1 < ratio < 2.4


def test_small_evaluation_writes_metrics_report_and_plots(tmp_path):
    m = evaluate_mnist(["bim"], n=120, out=tmp_path, n_calibration=400, n_methods=40, methods=("ig", "saliency"),
                       log=lambda _: None)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["attacks"]["bim"]["n_adv"] == m["attacks"]["bim"]["n_adv"] > 100
    a = on_disk["attacks"]["bim"]
    for key in ("attack_success_rate", "detection_rate", "roc_auc", "sign_rule_detection_rate", "sign_rule_fpr"):
        assert 0.0 <= a[key] <= 1.0
    assert a["detection_rate"] > on_disk["clean_fpr"]
    # the clean side is every odd digit; the attacks use n of them, and their own FPR is reported beside
    assert on_disk["n_clean_eval"] == 5000 and on_disk["clean_fpr_attacked_digits"]["n"] == 120
    lo, hi = on_disk["clean_fpr_ci95"]
    assert lo <= on_disk["clean_fpr"] <= hi and lo <= a["detection_rate"] <= 1
    assert set(on_disk["baselines"]) == {"feature_squeezing", "magnet"}
    assert set(on_disk["methods"]) == {"ig", "saliency"}
    points = on_disk["operating_points"]
    assert list(points) == ["0.05", "0.01", "0.001"]  # the shipped calibration's, largest first
    rates = [points[k]["attacks"]["bim"]["detection_rate"] for k in points]
    assert rates == sorted(rates, reverse=True) and points["0.05"]["clean_fpr"] == on_disk["clean_fpr"]
    for baseline in on_disk["baselines"].values():
        assert list(baseline["operating_points"]) == list(points)
        fprs = [baseline["operating_points"][k]["clean_fpr"] for k in points]
        assert fprs == sorted(fprs, reverse=True)
    report = (tmp_path / "report.md").read_text()
    assert "paper EXPLAINER" in report and "BIM" in report and "| clean FPR |" in report
    for plot in ("entropy_distributions.png", "roc.png", "explanation_maps.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
