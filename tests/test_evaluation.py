"""The evaluation protocol's pieces, and a small end-to-end run of ``evaluate`` that writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluate_mnist import evaluate_mnist
from pipeline.evaluation import roc_auc


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    clean = np.round(rng.normal(0, 1, 300), 1)
    adv = np.round(rng.normal(0.7, 1, 200), 1)
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[clean, adv])
    assert roc_auc(clean, adv) == pytest.approx(expected, abs=1e-12)


def test_small_evaluation_writes_metrics_report_and_plots(tmp_path):
    m = evaluate_mnist(["bim"], n=120, out=tmp_path, n_calibration=400, n_methods=40, methods=("ig", "saliency"),
                       log=lambda _: None)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["attacks"]["bim"]["n_adv"] == m["attacks"]["bim"]["n_adv"] > 100
    a = on_disk["attacks"]["bim"]
    for key in ("attack_success_rate", "detection_rate", "roc_auc", "sign_rule_detection_rate", "sign_rule_fpr"):
        assert 0.0 <= a[key] <= 1.0
    assert a["detection_rate"] > on_disk["clean_fpr"]
    assert set(on_disk["baselines"]) == {"feature_squeezing", "magnet"}
    assert set(on_disk["methods"]) == {"ig", "saliency"}
    report = (tmp_path / "report.md").read_text()
    assert "paper EXPLAINER" in report and "BIM" in report
    for plot in ("entropy_distributions.png", "roc.png", "explanation_maps.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
