"""The calibrated score's threshold: split in halves (the default) or cross-fitted over K folds.

These check statistical properties, so they draw clean "signals" from known distributions (many draws are
needed, and a distribution whose true tail is known is what makes the FPR measurable); the detector's real
signals on real digits are covered in test_detector.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from pipeline.calibration import Calibration, allowed_exceedances, fit_calibration

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


def test_each_operating_point_keeps_its_target_on_fresh_clean_images():
    """5%, 1% and 0.1% from one calibration of 6,000 clean images (3,000 held-out scores): each threshold is
    the conformal quantile for its own target, so on 200,000 fresh clean images each FPR lands near its target
    and never far above it, and a smaller target always means a higher threshold."""
    rng = np.random.default_rng(5)
    c = fit_calibration(_draw(rng, 6000), 0.05, model="m", method="saliency", entropy="spatial", images="",
                        use=SIGNALS, fprs=(0.01, 0.001))
    assert c.fprs == [0.05, 0.01, 0.001] and c.point().threshold == c.threshold == c.point(0.05).threshold
    assert c.point(0.05).threshold < c.point(0.01).threshold < c.point(0.001).threshold
    scores = c.score(_draw(rng, 200_000))
    for p in c.points:
        fpr = float(np.mean(scores > p.threshold))
        assert p.threshold_fpr <= p.target_fpr and 0.4 * p.target_fpr < fpr < 1.6 * p.target_fpr, (p, fpr)


def test_a_point_too_few_images_support_is_refused_or_left_out_when_asked():
    signals = _draw(np.random.default_rng(6), 400)  # 200 held-out scores: 1% needs 99, 0.1% needs 999
    kw = dict(model="m", method="saliency", entropy="spatial", images="", use=SIGNALS)
    with pytest.raises(ValueError, match=r"200 held-out clean scores cannot set a threshold at FPR 0\.1%.*999"):
        fit_calibration(signals, 0.05, fprs=(0.01, 0.001), **kw)
    c = fit_calibration(signals, 0.05, fprs=(0.01, 0.001), drop_unsupported=True, **kw)
    assert c.fprs == [0.05, 0.01]
    with pytest.raises(ValueError, match=r"holds thresholds for FPR 5%, 1%, not 0\.1%"):
        c.point(0.001)
    with pytest.raises(ValueError, match="cannot set a threshold at FPR 0.1%"):  # never the default point
        fit_calibration(signals, 0.001, drop_unsupported=True, **kw)


def test_with_confidence_every_point_leaves_at_most_its_allowed_exceedances(tmp_path):
    c = fit_calibration(_draw(np.random.default_rng(7), 6000), 0.05, model="m", method="saliency",
                        entropy="spatial", images="", use=SIGNALS, fprs=(0.01, 0.001), confidence=0.95)
    for p in c.points:
        assert round(p.threshold_fpr * 3000) == allowed_exceedances(3000, p.target_fpr, 0.95)
    c.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json") == c


def test_a_calibration_written_before_operating_points_has_its_one_point(tmp_path):
    c = _fit(_draw(np.random.default_rng(8), 300), None)
    data = json.loads(json.dumps({**asdict(c), "version": 2}))
    del data["points"]
    old = Calibration.from_dict(data)
    assert old.fprs == [0.05] and old.point().threshold == c.threshold


def test_calibrate_check_says_whether_each_operating_point_holds_on_a_folder(tmp_path, digits):
    """`explainer calibrate --check DETECTOR --images-dir CLEAN`: realised FPR and interval per point, exit 0
    when every point holds there; a site whose images look nothing like the calibration's fails (exit 1)."""
    import cv2
    from typer.testing import CliRunner

    from pipeline import Detector, check_points
    from worker.cli import app

    odd = digits.parity("odd")
    (tmp_path / "clean").mkdir()
    for i, image in enumerate(odd.images[:300]):
        cv2.imwrite(str(tmp_path / "clean" / f"{i:04d}.png"), image)
    done = CliRunner().invoke(app, ["calibrate", "--check", "mnist", "--images-dir", str(tmp_path / "clean")])
    assert done.exit_code == 0, done.output
    assert "300" in done.output and "holds" in done.output and "recalibrate" not in done.output
    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    for i in range(50):  # a camera whose images are nothing like clean digits: the thresholds do not hold there
        cv2.imwrite(str(tmp_path / "noise" / f"{i:04d}.png"), rng.integers(0, 256, (28, 28), dtype=np.uint8))
    done = CliRunner().invoke(app, ["calibrate", "--check", "mnist", "--images-dir", str(tmp_path / "noise")])
    assert done.exit_code == 1 and "recalibrate" in done.output
    det = Detector.from_pretrained("mnist")
    [five, *_] = check_points(det.calibration, np.r_[np.zeros(90), np.full(10, 1e9)])
    assert (five.flagged, five.n, five.holds) == (10, 100, False) and five.ci95[0] > 0.05


def test_signal_weights_scale_each_tail_score_and_round_trip(tmp_path):
    """A weighted sum counts each signal's tail score times its weight: weight 0 leaves a signal out of the
    score, and the weights travel with the calibration."""
    rng = np.random.default_rng(3)
    clean = _draw(rng, 400)
    kw = dict(model="m", method="saliency", entropy="spatial", images="", use=SIGNALS, combine="sum")
    weighted = fit_calibration(clean, 0.05, signal_weights={"map_shift": 0.0, "median_shift": 2.0}, **kw)
    plain = fit_calibration(clean, 0.05, use=("prediction_shift", "median_shift"), combine="sum",
                            model="m", method="saliency", entropy="spatial", images="")
    probe = _draw(rng, 50)
    moved = {**probe, "map_shift": probe["map_shift"] * 100}  # a signal with weight 0 cannot move the score
    assert np.array_equal(weighted.score(probe), weighted.score(moved))
    p, m = (plain.signals[k].tail_score(probe[k]) for k in ("prediction_shift", "median_shift"))
    assert np.allclose(weighted.score(probe), p + 2 * m)
    weighted.save(tmp_path / "cal.json")
    back = Calibration.load(tmp_path / "cal.json")
    assert back.signal_weights == {"map_shift": 0.0, "median_shift": 2.0}
    assert np.array_equal(back.score(probe), weighted.score(probe))


@pytest.mark.parametrize("weights", [{"map_shift": -1.0}, {"map_shift": float("nan")}, {"occlusion_shift": 1.0},
                                     dict.fromkeys(SIGNALS, 0.0)])
def test_bad_signal_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        fit_calibration(_draw(np.random.default_rng(4), 100), 0.05, model="m", method="saliency",
                        entropy="spatial", images="", use=SIGNALS, combine="sum", signal_weights=weights)


def test_grouped_calibration_holds_its_target_on_every_group():
    """Two cameras, one with clean scores shifted up: calibrated on the mix, the shifted one exceeds the target
    while the other stays below it; calibrated with the groups, each holds it (the threshold is the larger
    group's), and a group too small for a point leaves that point to the pooled threshold."""
    rng = np.random.default_rng(5)

    def camera(n: int, shift: float) -> dict[str, np.ndarray]:
        d = _draw(rng, n)
        return {k: v * (1 + shift) for k, v in d.items()}

    cal = {k: np.concatenate([a, b]) for (k, a), b in zip(camera(600, 0.0).items(), camera(400, 0.8).values(),
                                                         strict=True)}
    groups = np.array(["calm"] * 600 + ["busy"] * 400)
    fresh = {"calm": camera(20000, 0.0), "busy": camera(20000, 0.8)}
    kw = dict(model="m", method="saliency", entropy="spatial", images="", use=SIGNALS, combine="sum", folds=5,
              fprs=(0.01, 0.001), drop_unsupported=True)
    pooled = fit_calibration(cal, 0.05, **kw)
    grouped = fit_calibration(cal, 0.05, groups=groups, **kw)
    assert grouped.groups == {"busy": 400, "calm": 600}
    rate = {name: np.mean(pooled.score(s) > pooled.threshold) for name, s in fresh.items()}
    assert rate["busy"] > 0.08 and rate["calm"] < 0.04  # the mix's threshold fits neither camera
    for fpr in (0.05, 0.01):
        threshold = grouped.point(fpr).threshold
        for name, s in fresh.items():
            assert np.mean(grouped.score(s) > threshold) < fpr * 1.5, (fpr, name)
    # 0.1% needs 999 held-out scores: no camera has them, the 1,000 together do, so the pooled threshold stands
    assert grouped.point(0.001).threshold == pooled.point(0.001).threshold


def test_calibrate_per_folder_records_each_camera_and_holds_on_each(tmp_path, digits):
    """`explainer calibrate --images-dir CAMERAS --per-folder`: each subfolder is a camera; the calibration records
    them, and each point's threshold is at least the one that camera alone would need."""
    import cv2
    from typer.testing import CliRunner

    from worker.cli import app

    even = digits.parity("even").images
    for camera, images in (("gate", even[:200]), ("dock", np.clip(even[200:400].astype(int) + 40, 0, 255))):
        (tmp_path / "cams" / camera).mkdir(parents=True)
        for i, image in enumerate(images):
            cv2.imwrite(str(tmp_path / "cams" / camera / f"{i:04d}.png"), image.astype(np.uint8))
    args = ["calibrate", "--model", "mnist", "--images-dir", str(tmp_path / "cams"), "--fprs", "0.05"]
    done = CliRunner().invoke(app, [*args, "--per-folder", "--out", str(tmp_path / "grouped.json")])
    assert done.exit_code == 0, done.output
    grouped = Calibration.load(tmp_path / "grouped.json")
    assert grouped.groups == {"dock": 200, "gate": 200} and "2 cameras" in grouped.images
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "pooled.json")])
    assert done.exit_code == 0, done.output
    pooled = Calibration.load(tmp_path / "pooled.json")
    assert not pooled.groups and grouped.threshold >= pooled.threshold
