"""The ImageNet evaluation path end to end on real photos and the real MobileNetV2 (small sizes; slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.datasets import SHARED_DATA, load_imagenet_sample
from pipeline.models.imagenet import SHARED_WEIGHTS

needs_photos = pytest.mark.skipif(
    not SHARED_WEIGHTS["mobilenet_v2"].exists(), reason="needs ../shared/models/mobilenet_v2_imagenet.pth"
)


@pytest.mark.slow
@needs_photos
def test_imagenet_evaluation_writes_metrics_and_report(tmp_path):
    from evaluation.imagenet import evaluate_imagenet

    load_imagenet_sample()  # raises if the photos are missing
    m = evaluate_imagenet("mobilenet_v2", None, ["patch", "bim"], n=6, out=tmp_path, n_calibration=48,
                          attack_options={"patch": {"steps": 3, "batch_size": 4}, "bim": {"steps": 3}})
    assert m["n_clean_eval"] == 6 and 0 <= m["clean_fpr"] <= 1
    assert m["calibration_images"].startswith("48 photos no ImageNet model trained on")
    assert "8 of them kept out" in m["calibration_images"]  # the transplant's hosts
    fprs = m["sources"]["fpr"]  # every source's evaluation photos, each with its own FPR and interval
    assert set(fprs) == {"imagenet-sample", "nips17", "imagenette-val"}
    assert sum(p["0.05"]["n"] for p in fprs.values()) == 6
    assert all(0 <= p["0.05"]["ci95"][0] <= p["0.05"]["fpr"] <= p["0.05"]["ci95"][1] for p in fprs.values())
    assert list(m["operating_points"]) == ["0.05"]  # 20 held-out scores: too few for 1% (99) and 0.1% (999)
    bim = m["attacks"]["bim"]
    assert bim["attempted"] >= 3 and bim["params"]["steps"] == 3
    assert m["attacks"]["patch"]["params"]["steps"] == 3
    targeted = m["attacks"]["patch"]["targeted"]  # Brown et al.'s success: classified as the target class
    assert targeted["target_class"] == m["attacks"]["patch"]["params"]["target_class"]
    assert 0 <= targeted["n_adv"] <= m["attacks"]["patch"]["n_adv"]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk["attacks"]) == {"patch", "bim"}
    for name in ("report.md", "roc.png", "entropy_distributions.png", "explanation_maps.png", "calibration.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Clean FPR per photo source" in (tmp_path / "report.md").read_text()


def test_targeted_breakdown_counts_only_photos_classified_as_the_target():
    from evaluation.imagenet import targeted_breakdown
    from evaluation.metrics import Scored

    def scored(score, flagged, classes):
        return Scored(score=np.array(score, float), flagged=np.array(flagged), sign_flagged=np.array(flagged),
                      signals={}, seconds=1.0, predicted_class=np.array(classes))

    clean = scored([0.1, 0.2, 0.3, 0.4], [False] * 4, [1, 2, 3, 4])
    patched = scored([5.0, 6.0, 0.15, 7.0], [True, True, False, True], [859, 859, 3, 12])
    t = targeted_breakdown(clean, patched, attempted=5, target_class=859)
    assert t["n_adv"] == 2 and t["targeted_success_rate"] == 0.4
    assert t["detection_rate"] == 1.0 and t["roc_auc"] == 1.0
    assert t["detection_rate_other_misclassified"] == 0.5


@pytest.mark.skipif(not (SHARED_DATA / "nips17" / "labels.csv").exists(), reason="needs ../shared/data photo sets")
def test_photo_sources_split_calibration_from_evaluation():
    """Every photo no ImageNet model trained on is in exactly one half; the ImageNet sample's odd photos, which
    no choice used, are its evaluation half; the calibration holds 1,050 photos, 1,042 without the transplant's
    hosts: enough for a 0.1% point (999)."""
    from evaluation.datasets import PHOTO_SOURCES, load_labelled_photos

    calibration, evaluation = [], []
    for source in PHOTO_SOURCES:
        cal, ev = source.split()
        assert len(cal) + len(ev) == len(source.rows()) and not set(cal) & set(ev)
        calibration += cal
        evaluation += ev
    assert len(calibration) == 1050 and len(evaluation) == 450
    assert [r for r in evaluation if "imagenet-sample" in str(r[0])] == load_imagenet_sample()[1::2]
    seen = {p for p, _ in load_labelled_photos("imagenette", "imagenet-train")}  # ImageNet training photos
    assert not seen & {p for p, _ in calibration + evaluation}


def test_labelled_csv_paths_are_relative_to_it_and_bad_files_are_refused(tmp_path):
    from evaluation.imagenet import load_labelled_csv

    (tmp_path / "labels.csv").write_text("path,label\nimages/a.jpg,3\n/abs/b.png,0\n")
    assert load_labelled_csv(tmp_path / "labels.csv") == [(tmp_path / "images/a.jpg", 3), (Path("/abs/b.png"), 0)]
    (tmp_path / "bad.csv").write_text("file,class\na.jpg,3\n")
    with pytest.raises(ValueError, match="path,label"):
        load_labelled_csv(tmp_path / "bad.csv")


@pytest.mark.slow
@needs_photos
def test_a_calibrated_bundle_is_evaluated_on_its_users_labelled_photos(tmp_path):
    """``explainer evaluate --detector BUNDLE --photos CSV``: every photo scored clean, FPR per operating point,
    the odd photos attacked with the patch trained on the even ones."""
    from pipeline import Detector
    from worker.cli import app

    rows = load_imagenet_sample()[1::2][:8]  # odd photos: the shipped calibration never saw them
    (tmp_path / "photos.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    Detector.from_pretrained("mobilenet_v2").save(tmp_path / "bundle")
    result = CliRunner().invoke(app, ["evaluate", "--detector", str(tmp_path / "bundle"), "--photos",
                                      str(tmp_path / "photos.csv"), "--attacks", "bim-early",
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["n_clean_eval"] == 8 and m["sources"]["fpr"]["given"]["0.05"]["n"] == 8
    assert m["attacks"]["bim-early"]["attempted"] <= 4  # the odd half of the given photos
    assert "labelled photos the calibration never saw" in (tmp_path / "report" / "report.md").read_text()
