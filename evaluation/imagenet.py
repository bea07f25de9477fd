"""``explainer evaluate --model mobilenet_v2|resnet18``: the paper's second experiment on real ImageNet photos.

Protocol (the MNIST one, on the 500 sample photos of ``../shared/data/imagenet-sample``): photos at even
positions of ``labels.csv`` calibrate the detector and train the universal patch; photos at odd positions are
evaluated, clean and attacked. Every photo is resized and centre-cropped to 224 × 224 once, as torchvision does;
attacks work at that resolution and their output is quantised to uint8, so the detector judges exactly the
pixels an attacker would send. Only correctly classified photos are attacked and only adversarials that still
fool the model count.

The defaults are sized for a 2-core CPU: every odd photo (250) is evaluated, Grad-CAM maps (one backward pass
to the last block), attacks with 10 steps; it runs in minutes, and all of it is recorded in the report.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evaluation.attacks import BIM, CWL2, PGD, AdversarialPatch
from evaluation.datasets import PHOTO_SOURCES, load_imagenet_sample
from evaluation.metrics import (
    AttackRun,
    Progress,
    Scored,
    evaluation_metrics,
    fpr_key,
    machine_description,
    predict,
    roc_auc,
    run_attack,
    score_images,
    to_tensor,
)
from pipeline import DEFAULT_FPRS, Detector, DetectorConfig, default_config, default_folds, default_scoring
from pipeline.calibration import check_points
from pipeline.inputs import read_image_file
from pipeline.models import TargetModel, load_model

# L∞ budgets of the ImageNet literature (8/255 as in Madry et al. / Kurakin et al.'s 16/255 halved); the patch
# covers 64 × 64 = 8% of a 224 × 224 image (Brown et al. report high success from about 10%).
TOASTER = 859
IMAGENET_ATTACKS = {
    "bim": partial(BIM, eps=8 / 255, alpha=2 / 255, steps=10),
    "bim-early": partial(BIM, eps=8 / 255, alpha=2 / 255, steps=10, early_stop=True),
    "pgd": partial(PGD, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True),
    "pgd-2": partial(PGD, eps=2 / 255, alpha=0.5 / 255, steps=10, random_start=True),
    # CW-L2 at a photo's scale: 3 binary-search steps of 30 Adam iterations at lr 0.01 in tanh space
    "cw-l2": partial(CWL2, c=1.0, kappa=0.0, steps=30, binary_search_steps=3, lr=0.01),
    "patch": partial(AdversarialPatch, patch_size=64, target_class=TOASTER, steps=200, lr=0.1, batch_size=8),
}


# attacks too costly to run on every evaluation photo on 2 CPU cores: at most this many, spread over them
ATTACK_PHOTOS = {"cw-l2": 120}


def load_photos(model: TargetModel, rows: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 224, 224, 3) photos as the model sees them, and their ImageNet labels."""
    images = np.concatenate([model.prepare(read_image_file(p)[None]) for p, _ in rows])
    return images, np.array([label for _, label in rows], dtype=np.int64)


def even_photo_validation(
    model: TargetModel, attacks: tuple[str, ...], patch_steps: int = 200, log: Progress = print,
    patch_holdout: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, AttackRun]]:
    """The validation split of the ImageNet probes and searches, from even-positioned photos only: the even
    photos at even positions of that list (train the patch; clean calibration photos), the other even photos
    (validation), and each attack run on the validation photos. The evaluation photos (odd) are never read.
    ``patch_holdout``: rows of the calibration photos the patch does not train on (the transplant's hosts)."""
    even = load_imagenet_sample()[0::2]
    train_images, _ = load_photos(model, even[0::2])
    val_images, val_labels = load_photos(model, even[1::2])
    runs = {}
    for name in attacks:
        attack = IMAGENET_ATTACKS[name](**({"steps": patch_steps} if name == "patch" else {}))
        if isinstance(attack, AdversarialPatch):
            kept = train_images if patch_holdout is None else np.delete(train_images, patch_holdout, axis=0)
            attack.fit(model.net, to_tensor(kept).to(model.device))
        runs[name] = run_attack(model, name, attack, val_images, val_labels, batch=16)
        log(f"{name}: success {runs[name].success_rate:.1%} of {runs[name].attempted}")
    return train_images, val_images, runs


def targeted_breakdown(clean: Scored, patched: Scored, attempted: int, target_class: int) -> dict:
    """The patch is a targeted attack: Brown et al. count a success when the photo is classified as the target
    class. Our headline counts every misclassified patched photo (stricter: it includes photos the patch only
    covered, so that the model erred with low confidence); this is the detection on the targeted successes."""
    hit = patched.predicted_class == target_class
    out = {"target_class": int(target_class), "n_adv": int(hit.sum()),
           "targeted_success_rate": float(hit.sum() / max(attempted, 1))}
    if hit.any():
        out["detection_rate"] = float(patched.flagged[hit].mean())
        out["roc_auc"] = roc_auc(clean.score, patched.score[hit])
    if (~hit).any():
        out["detection_rate_other_misclassified"] = float(patched.flagged[~hit].mean())
    return out


def spread(rows: list, n: int) -> list:
    """``n`` rows evenly spaced over the list (the sample is ordered by class)."""
    if n >= len(rows):
        return rows
    return [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]


def load_sources(model: TargetModel, n_calibration: int | None = None, n: int | None = None
                 ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray], dict]:
    """The calibration photos, labels and source names of every source of
    :data:`evaluation.datasets.PHOTO_SOURCES`, and the evaluation photos, labels and source names; ``n_calibration``
    / ``n`` keep that many of each, spread over the sources (quick checks). Also {source: (calibration count,
    evaluation count)}."""
    cal_rows, eval_rows, names, counts = [], [], [], {}
    for source in PHOTO_SOURCES:
        cal, ev = source.split()
        cal_rows += [(*row, source.name) for row in cal]
        eval_rows += ev
        names += [source.name] * len(ev)
        counts[source.name] = [len(cal), len(ev)]
    if n_calibration is not None:
        cal_rows = spread(cal_rows, n_calibration)
    cal_sources = np.array([r[2] for r in cal_rows])
    cal_rows = [(path, label) for path, label, _ in cal_rows]
    for name in counts:
        counts[name][0] = int((cal_sources == name).sum())
    if n is not None and n < len(eval_rows):
        keep = np.linspace(0, len(eval_rows) - 1, n).round().astype(int)
        eval_rows, names = [eval_rows[i] for i in keep], [names[i] for i in keep]
    for name in counts:
        counts[name][1] = names.count(name)
    return (*load_photos(model, cal_rows), cal_sources), (*load_photos(model, eval_rows), np.array(names)), counts


def source_fprs(det: Detector, clean: Scored, sources: np.ndarray) -> dict:
    """Per photo source and operating point: the clean photos flagged, the realised FPR and its 95% Wilson
    interval, and whether the target lies inside it (:func:`pipeline.calibration.check_points`)."""
    out = {}
    for name in dict.fromkeys(sources.tolist()):
        rows = sources == name
        out[name] = {fpr_key(c.target_fpr): {"n": c.n, "flagged": c.flagged, "fpr": c.fpr, "ci95": list(c.ci95),
                                            "holds": c.holds}
                     for c in check_points(det.calibration, clean.score[rows])}
    return out


def evaluate_imagenet(
    model_name: str, weights: str | Path | None, attacks: list[str], n: int | None, out: Path,
    target_fpr: float = 0.05, config: DetectorConfig | None = None, log: Progress = print, seed: int = 0,
    command: str = "explainer evaluate --model mobilenet_v2", n_calibration: int | None = None,
    attack_options: dict[str, dict] | None = None, folds: int | None = None, device: str | None = None,
) -> dict:
    """Calibrate on the calibration photos of every source, attack and score the evaluation photos, write
    metrics.json, report.md and plots to ``out``.

    ``config`` (default the model's preset), ``folds`` (default its cross-fitting; fewer than 10 photos a fold:
    two halves) and the preset's combination of the signals make the detector.
    ``n`` / ``n_calibration`` limit the evaluation / calibration photos and ``attack_options`` overrides attack
    parameters (e.g. ``{"patch": {"steps": 5}}``): for quick checks only; the report records what was used.
    ``device``: where the model, its attacks and its explanations run (NLM and inpainting stay on the CPU)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)  # Captum's GradientShap draws its interpolation points from numpy's global generator
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name, weights)
    if device:
        model.to(device)
    config = config or default_config(model_name)
    folds = folds or default_folds(model_name)
    log("loading the calibration and evaluation photos of " + ", ".join(s.name for s in PHOTO_SOURCES) + "…")
    (cal_images, _, cal_sources), (eval_images, eval_labels, eval_sources), counts = load_sources(
        model, n_calibration, n)

    det = Detector(model, config)
    log(f"calibrating on {len(cal_images)} clean photos…")
    folds = folds if folds and len(cal_images) >= 10 * folds else None  # a quick check's few photos: two halves
    described = ", ".join(f"{name} {c}" for name, (c, _) in counts.items())
    det.calibrate(cal_images, target_fpr, images=f"{len(cal_images)} photos no ImageNet model trained on "
                  f"({described})", batch_size=16, folds=folds, fprs=DEFAULT_FPRS, drop_unsupported=True,
                  groups=cal_sources, **default_scoring(model_name))
    det.calibration.save(out / "calibration.json")
    log("scoring the clean evaluation photos…")
    clean = score_images(det, eval_images, batch=16)
    accuracy = float((predict(model, eval_images, batch=32) == eval_labels).mean())
    log(f"  clean FPR {clean.flagged.mean():.1%}; model top-1 on these photos {accuracy:.1%}")
    # the attacker trains on calibration photos but not on the transplant's hosts, which an operator keeps private
    patch_photos = np.delete(cal_images, det.host_rows(len(cal_images)), axis=0)
    runs, scored = attack_and_score(det, eval_images, eval_labels, attacks, patch_photos, attack_options, log)
    metrics = photo_metrics(det, clean, runs, scored, target_fpr, accuracy, len(patch_photos))
    metrics["sources"] = {"photos": counts, "fpr": source_fprs(det, clean, eval_sources)}
    return write_photo_report(out, metrics, det, clean, scored, runs, eval_images, start, command)


def attack_and_score(det: Detector, images: np.ndarray, labels: np.ndarray, attacks: list[str],
                     patch_photos: np.ndarray, attack_options: dict[str, dict] | None = None,
                     log: Progress = print) -> tuple[dict[str, AttackRun], dict[str, Scored]]:
    """Each attack on the correctly classified ``images`` (at most :data:`ATTACK_PHOTOS` of them where it says
    so), its successes scored by ``det``; the patch is trained on ``patch_photos`` first."""
    model = det.model
    runs: dict[str, AttackRun] = {}
    scored: dict[str, Scored] = {}
    for name in attacks:
        attack = IMAGENET_ATTACKS[name](**(attack_options or {}).get(name, {}))
        if isinstance(attack, AdversarialPatch):
            log(f"training the universal patch on {len(patch_photos)} photos…")
            t = time.perf_counter()
            attack.fit(model.net, to_tensor(patch_photos).to(model.device))
            log(f"  trained in {time.perf_counter() - t:.0f}s")
        rows = np.arange(len(images))
        if name in ATTACK_PHOTOS and ATTACK_PHOTOS[name] < len(rows):
            rows = np.linspace(0, len(rows) - 1, ATTACK_PHOTOS[name]).round().astype(int)
        log(f"attack {name} on {len(rows)} photos…")
        runs[name] = run_attack(model, name, attack, images[rows], labels[rows], batch=16)
        runs[name].source = rows[runs[name].source]
        log(f"  success {runs[name].success_rate:.1%} of {runs[name].attempted} in {runs[name].seconds:.0f}s; scoring…")
        scored[name] = score_images(det, runs[name].images, batch=16)
    return runs, scored


def photo_metrics(det: Detector, clean: Scored, runs: dict[str, AttackRun], scored: dict[str, Scored],
                  target_fpr: float, accuracy: float, patch_photos: int) -> dict:
    """metrics.json's content for a photo evaluation (:func:`evaluation.metrics.evaluation_metrics` and the
    patch's targeted count, the model's accuracy, the combination rule and the attacks' photo limits)."""
    metrics = evaluation_metrics(det.model.name, det, clean, runs, scored, target_fpr)
    if "patch" in scored:
        metrics["attacks"]["patch"]["targeted"] = targeted_breakdown(
            clean, scored["patch"], runs["patch"].attempted, runs["patch"].params["target_class"])
        metrics["attacks"]["patch"]["training_photos"] = patch_photos
    metrics["clean_top1"] = accuracy
    metrics["combine"] = det.calibration.combine
    metrics["calibration_groups"] = det.calibration.groups
    metrics["attack_photos"] = ATTACK_PHOTOS
    return metrics


def write_photo_report(out: Path, metrics: dict, det: Detector, clean: Scored, scored: dict[str, Scored],
                       runs: dict[str, AttackRun], eval_images: np.ndarray, start: float, command: str) -> dict:
    metrics["seconds"] = time.perf_counter() - start
    metrics["command"] = command
    metrics["machine"] = machine_description()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from evaluation.report import write_imagenet_report

    write_imagenet_report(out, metrics, det, clean, scored, runs, eval_images)
    return metrics


def load_labelled_csv(path: Path) -> list[tuple[Path, int]]:
    """(photo path, class) rows of a CSV with ``path,label`` columns (header first); a path is relative to the
    CSV's folder unless absolute, and a label is the model's own output index."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns path,label and at least one row")
    return [((path.parent / r["path"]) if not Path(r["path"]).is_absolute() else Path(r["path"]), int(r["label"]))
            for r in rows]


def evaluate_bundle(
    det: Detector, photos: list[tuple[Path, int]], attacks: list[str], out: Path, log: Progress = print,
    seed: int = 0, command: str = "explainer evaluate --detector", attack_options: dict[str, dict] | None = None,
    description: str = "",
) -> dict:
    """A user's calibrated detector on their own labelled photos, none of them seen by its calibration: the clean
    FPR at each operating point on every photo; the attacks on the photos at odd positions (the patch trained on
    the even ones, less nothing the operator keeps: the hosts are in the bundle, not among these photos)."""
    if det.calibration is None:
        raise ValueError(f"detector {det.model.name} has no calibration: calibrate it first (explainer calibrate)")
    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    model = det.model
    # the patch keeps its share of the photo (64 × 64 of 224 × 224: 8%) at the model's input size
    options = {**(attack_options or {})}
    options["patch"] = {"patch_size": max(8, round(64 * model.size / 224)), **options.get("patch", {})}
    images, labels = load_photos(model, photos)
    log(f"scoring {len(images)} clean photos…")
    clean = score_images(det, images, batch=16)
    accuracy = float((predict(model, images, batch=32) == labels).mean())
    log(f"  clean FPR {clean.flagged.mean():.1%}; model top-1 on these photos {accuracy:.1%}")
    runs, scored = attack_and_score(det, images[1::2], labels[1::2], attacks, images[0::2], options, log)
    for run in runs.values():
        run.source = 2 * run.source + 1
    metrics = photo_metrics(det, clean, runs, scored, det.calibration.target_fpr, accuracy, len(images[0::2]))
    metrics["protocol"] = description or (
        f"{len(images)} labelled photos the calibration never saw ({det.calibration.images} calibrated it): all "
        "scored clean; those at odd positions attacked, the patch trained on those at even positions")
    metrics["sources"] = {"photos": {"given": [0, len(images)]},
                          "fpr": source_fprs(det, clean, np.array(["given"] * len(images)))}
    return write_photo_report(out, metrics, det, clean, scored, runs, images[1::2], start, command)
