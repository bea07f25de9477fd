"""The evaluation protocol behind ``explainer evaluate``: attacks, detection rates, FPR, ROC-AUC, baselines.

Protocol (stated in every report): thresholds come from clean calibration images only (even-indexed MNIST test
digits, or even-positioned ImageNet sample photos); evaluation uses the odd-indexed images and adversarials made
from them. Adversarials are quantised to uint8 (what a camera or the wire delivers) and only those that still
fool the model, made from correctly classified images, count; the attack success rate is reported. The FPR is
measured on the clean evaluation images (every odd one: the attacks may use fewer), and every rate comes with
its 95% Wilson interval. The paper's sign rule is reported beside the calibrated rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.calibration import rate_ci95
from pipeline.detector import Detector
from pipeline.models import TargetModel

Progress = Callable[[str], None]


def machine_description() -> str:
    """The machine an evaluation ran on, for its report."""
    import os
    import platform

    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {torch.get_num_threads()} torch threads"


def roc_auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """Area under the ROC curve of a score (higher = adversarial); ties count one half (Mann–Whitney U)."""
    clean, adversarial = np.asarray(clean, float), np.asarray(adversarial, float)
    if len(clean) == 0 or len(adversarial) == 0:
        return float("nan")
    both = np.concatenate([clean, adversarial])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(clean):].sum() - len(adversarial) * (len(adversarial) + 1) / 2
    return float(u / (len(clean) * len(adversarial)))


def flags_ci95(flags: np.ndarray) -> list[float]:
    """:func:`rate_ci95` of the share of True in ``flags`` (the images a detector flagged)."""
    return rate_ci95(int(np.sum(flags)), len(flags))


def roc_curve(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, for plotting."""
    thresholds = np.unique(np.concatenate([clean, adversarial]))[::-1]
    fpr = np.r_[0.0, [(clean >= t).mean() for t in thresholds]]
    tpr = np.r_[0.0, [(adversarial >= t).mean() for t in thresholds]]
    return fpr, tpr


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def to_uint8(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 in the layout of ``like``."""
    u8 = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return (u8.squeeze(1) if like.ndim == 3 else u8.permute(0, 2, 3, 1)).numpy()


def predict(model: TargetModel, images: np.ndarray, batch: int = 500) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(to_tensor(images[i : i + batch]).to(model.device)).argmax(1).cpu().numpy()
                               for i in range(0, len(images), batch)])


@dataclass
class AttackRun:
    name: str
    images: np.ndarray  # successful adversarials, uint8
    source: np.ndarray  # index into the clean evaluation set of each successful adversarial
    attempted: int
    success_rate: float
    seconds: float
    params: dict


def run_attack(
    model: TargetModel, name: str, attack, images: np.ndarray, labels: np.ndarray, batch: int = 200,
) -> AttackRun:
    """Attack the correctly classified ``images``; keep adversarials that still fool the model as uint8."""
    correct = np.flatnonzero(predict(model, images) == labels)
    start = time.perf_counter()
    advs = []
    for i in range(0, len(correct), batch):
        idx = correct[i : i + batch]
        x_adv = attack(model.net, to_tensor(images[idx]).to(model.device), torch.from_numpy(labels[idx]))
        advs.append(to_uint8(x_adv, images))
    seconds = time.perf_counter() - start
    adv = np.concatenate(advs) if advs else images[:0]
    fooled = predict(model, adv) != labels[correct] if len(adv) else np.zeros(0, bool)
    params = attack.params() if hasattr(attack, "params") else {}
    return AttackRun(name, adv[fooled], correct[fooled], len(correct), float(fooled.mean()) if len(correct) else 0.0,
                     seconds, params)


@dataclass
class Scored:
    """Both rules' outcomes and every signal for a set of images."""

    score: np.ndarray
    flagged: np.ndarray
    sign_flagged: np.ndarray
    signals: dict[str, np.ndarray]
    seconds: float
    predicted_class: np.ndarray  # the model's class for each image (as the detector saw it)


def score_images(det: Detector, images: np.ndarray, batch: int = 256) -> Scored:
    """Explain once per batch, then apply the calibrated rule and the paper's sign rule to the same maps. No
    images (an attack that fooled the model on none): empty arrays, every signal among them."""
    if len(images) == 0:
        from pipeline.decision import BASE_SIGNALS

        empty = np.zeros(0)
        signals = {k: empty for k in (*BASE_SIGNALS, *det.config.model_signals())}
        return Scored(empty, empty.astype(bool), empty.astype(bool), signals, 0.0, empty.astype(np.int64))
    parts = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        x = det.prepare(images[i : i + batch])
        explained = det.explain_pair(x, det.denoise(x))
        parts.append((det.decide(explained, "calibrated"), det.decide(explained, "sign")))
    seconds = time.perf_counter() - start
    cal = [p[0] for p in parts]
    sign = [p[1] for p in parts]
    signals = {k: np.concatenate([r.signals[k] for r in cal]) for k in cal[0].signals}
    return Scored(np.concatenate([r.score for r in cal]), np.concatenate([r.is_adversarial for r in cal]),
                  np.concatenate([r.is_adversarial for r in sign]), signals, seconds,
                  np.concatenate([r.predicted_class for r in cal]))


def detection_metrics(clean: Scored, adv: Scored) -> dict:
    return {
        "n_adv": int(len(adv.score)),
        "detection_rate": float(adv.flagged.mean()) if len(adv.score) else float("nan"),
        "detection_rate_ci95": flags_ci95(adv.flagged),
        "roc_auc": roc_auc(clean.score, adv.score),
        "sign_rule_detection_rate": float(adv.sign_flagged.mean()) if len(adv.score) else float("nan"),
        "sign_rule_fpr": float(clean.sign_flagged.mean()),
        "signal_roc_auc": {k: roc_auc(clean.signals[k], adv.signals[k]) for k in clean.signals},
    }


def fpr_key(fpr: float) -> str:
    """How metrics.json names an operating point: 0.01 -> "0.01"."""
    return f"{fpr:g}"


def operating_points(det: Detector, clean: Scored, scored: dict[str, Scored],
                     runs: dict[str, AttackRun] | None = None) -> dict:
    """Per operating point of ``det``'s calibration: its threshold, the clean FPR it gives (with its 95%
    interval), every attack's detection rate at it (with its interval) and, given the ``runs``, its defended
    error (:func:`defended_error`)."""
    out = {}
    for point in det.calibration.points:
        flagged = clean.score > point.threshold
        attacks = {}
        for name, adv in scored.items():
            hit = adv.score > point.threshold
            attacks[name] = {"detection_rate": float(hit.mean()) if len(adv.score) else float("nan"),
                             "detection_rate_ci95": flags_ci95(hit)}
            if runs is not None and name in runs:
                attacks[name].update(defended_error(runs[name].attempted, hit))
        out[fpr_key(point.target_fpr)] = {
            "target_fpr": point.target_fpr, "threshold": point.threshold,
            "clean_fpr": float(flagged.mean()), "clean_fpr_ci95": flags_ci95(flagged), "attacks": attacks,
        }
    return out


def defended_error(attempted: int, detected: np.ndarray) -> dict:
    """The share of the ``attempted`` correctly classified images that the attack turned into a wrong answer the
    detector did not flag (``detected``: one flag per successful adversarial), with its 95% Wilson interval: the
    error an operator who trusts unflagged answers meets under that attack."""
    evaded = int((~np.asarray(detected, bool)).sum())
    return {"defended_error": evaded / attempted if attempted else float("nan"),
            "defended_error_ci95": rate_ci95(evaded, attempted)}


def method_detector(det: Detector, method: str, calibration_images: np.ndarray, target_fpr: float) -> Detector:
    """A detector like ``det`` but explaining with ``method``, calibrated on the same clean images."""
    from dataclasses import replace

    other = Detector(det.model, replace(det.config, method=method))
    other.calibrate(calibration_images, target_fpr, images=f"{len(calibration_images)} calibration images",
                    combine=det.calibration.combine)
    return other


def evaluation_metrics(model: str, det: Detector, clean: Scored, runs: dict[str, AttackRun],
                       scored: dict[str, Scored], target_fpr: float) -> dict:
    """The part of metrics.json every evaluation shares: the detector, the clean FPR of both rules, and per
    attack its success rate and detection metrics (``explainer evaluate``'s documented shape)."""
    cfg = det.config
    return {
        "model": model, "method": cfg.method, "entropy": cfg.entropy, "config": cfg.to_dict(),
        "n_clean_eval": len(clean.score), "target_fpr": target_fpr,
        "threshold": det.calibration.threshold, "calibration_images": det.calibration.images,
        "calibration_confidence": det.calibration.confidence, "calibration_folds": det.calibration.folds,
        "clean_fpr": float(clean.flagged.mean()),
        "clean_fpr_ci95": flags_ci95(clean.flagged),
        "sign_rule_fpr": float(clean.sign_flagged.mean()),
        "seconds_per_detection": clean.seconds / len(clean.score),
        "operating_points": operating_points(det, clean, scored, runs),
        "attacks": {
            name: {"params": run.params, "attempted": run.attempted, "attack_success_rate": run.success_rate,
                   "attack_seconds": run.seconds, **detection_metrics(clean, scored[name])}
            for name, run in runs.items()
        },
    }
