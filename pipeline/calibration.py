"""Turn per-image signals into one anomaly score calibrated on clean images only, and pick its threshold.

Signals come from what one detection batch already computes (:data:`pipeline.signals.SIGNALS`). Each is mapped
to a tail probability under its clean distribution (the empirical CDF, stored as quantiles; which tail is
unusual comes from the signal's registration). The score is -log10 of the smallest tail probability: large when
any signal is unusual for a clean image. Beyond the calibrated range the score keeps growing linearly in the
distance from the extreme quantile (in units of the central spread), so ranking and ROC-AUC stay meaningful
there.

No adversarial example is used: the score says "unlike clean images", so attacks never seen at calibration are
covered too. The empirical CDFs and the threshold come from disjoint halves of the calibration images, or are
cross-fitted over K folds (each image scored against CDFs that never saw it), so the threshold is set on
out-of-sample scores; it is their conformal quantile, so that a new clean image exceeds it with probability at
most the target.

A calibration holds one threshold per operating point (target FPRs such as 5%, 1% and 0.1%), all set on the same
out-of-sample scores; the detector decides at one of them, picked at run time. A point that the clean images
cannot support (a conformal quantile at FPR a needs at least 1/a - 1 held-out scores) is refused, never
extrapolated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DetectorConfig
from pipeline.signals import SIGNALS

CALIBRATION_VERSION = 4
N_QUANTILES = 1001
# the operating points a calibration adds beside its default target when asked for none (explainer calibrate)
DEFAULT_FPRS = (0.01, 0.001)
COMBINE_RULES = ("max", "sum")


@dataclass
class SignalReference:
    """The clean distribution of one signal, as quantiles at levels 0, 0.001, ..., 1."""

    quantiles: list[float]
    tails: str
    n: int

    def tail_score(self, values: np.ndarray) -> np.ndarray:
        """-log10 tail probability of ``values`` under this clean distribution (higher = more unusual)."""
        q = np.asarray(self.quantiles)
        levels = np.linspace(0.0, 1.0, len(q))
        floor = 1.0 / (self.n + 1)
        cdf = np.interp(values, q, levels)
        spread = max(float(q[750] - q[250]), 1e-12)
        if self.tails == "upper":
            p = np.clip(1.0 - cdf, floor, 1.0)
            beyond = np.clip(values - q[-1], 0, None) / spread
        else:
            p = np.clip(2.0 * np.minimum(cdf, 1.0 - cdf), floor, 1.0)
            beyond = (np.clip(values - q[-1], 0, None) + np.clip(q[0] - values, 0, None)) / spread
        return -np.log10(p) + beyond


@dataclass
class OperatingPoint:
    """One threshold: ``target_fpr``, the threshold set for it, and the FPR it gave on the held-out scores."""

    target_fpr: float
    threshold: float
    threshold_fpr: float


def rate_ci95(hits: int, n: int) -> list[float]:
    """95% Wilson score interval of a rate of ``hits`` in ``n`` (a detection rate, an FPR): how far the true
    rate may be from the measured one with this many images. Wilson rather than the normal approximation,
    which is wrong near 0% and 100%, where detection rates and FPRs live."""
    if n == 0:
        return [float("nan"), float("nan")]
    z, p = 1.959964, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


@dataclass(frozen=True)
class PointCheck:
    """How one operating point fares on clean images it never saw: ``flagged`` of ``n`` (``fpr``), its 95%
    Wilson interval, and whether the target still holds there (the interval reaches down to the target: no more
    false alerts than promised). ``conservative``: the interval lies below the target, so the threshold flags
    fewer clean images than it may there, and recalibrating on these images would catch more attacks."""

    target_fpr: float
    threshold: float
    n: int
    flagged: int
    fpr: float
    ci95: tuple[float, float]
    holds: bool
    conservative: bool = False


def check_points(calibration: Calibration, scores: np.ndarray) -> list[PointCheck]:
    """Each operating point of ``calibration`` on the combined scores of clean images: whether its threshold
    still holds where those images come from (a camera, a site), or the detector needs recalibrating there."""
    scores = np.asarray(scores, dtype=np.float64)
    out = []
    for point in calibration.points:
        flagged = int((scores > point.threshold).sum())
        low, high = rate_ci95(flagged, len(scores))
        out.append(PointCheck(point.target_fpr, point.threshold, len(scores), flagged,
                              flagged / max(len(scores), 1), (low, high), low <= point.target_fpr,
                              high < point.target_fpr))
    return out


def fpr_label(fpr: float) -> str:
    """A target FPR as people write it: 0.05 -> "5%", 0.001 -> "0.1%"."""
    return f"{100 * fpr:.4g}%"


@dataclass
class Calibration:
    """Everything needed to score and decide, saved as JSON beside the model."""

    model: str
    method: str
    entropy: str
    target_fpr: float
    threshold: float
    n_reference: int
    n_threshold: int
    threshold_fpr: float
    images: str
    signals: dict[str, SignalReference]
    config: dict = field(default_factory=dict)
    # None: the threshold's expected FPR is the target. p: the target FPR holds with confidence p (below).
    confidence: float | None = None
    # None: CDFs and threshold from disjoint halves. K: cross-fitted over K folds (fit_calibration)
    folds: int | None = None
    # the transplant check's clean host images, base64 PNG (pipeline.transplant); empty when it is off
    hosts: list[str] = field(default_factory=list)
    # every operating point, the default one (target_fpr, threshold) among them, largest target FPR first
    points: list[OperatingPoint] = field(default_factory=list)
    # how the signals' tail scores become one score: "max" (any one unusual signal) or "sum" (-log10 of the
    # product of the tail probabilities: several moderately unusual signals add up)
    combine: str = "max"
    # how much each signal's tail score counts in the combination (absent: 1); chosen on validation data, where
    # attacks may be used, and fixed before the clean images set the threshold
    signal_weights: dict[str, float] = field(default_factory=dict)
    # each fitted signal's state, fitted on the clean images (pipeline.signals.Signal.fitted)
    fitted: dict[str, dict] = field(default_factory=dict)
    # the groups of clean images (cameras, sources) each point was set to hold on, and how many of each
    groups: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.points = [p if isinstance(p, OperatingPoint) else OperatingPoint(**p) for p in self.points]
        if not self.points:  # a calibration written before operating points: its one threshold
            self.points = [OperatingPoint(self.target_fpr, self.threshold, self.threshold_fpr)]

    @property
    def fprs(self) -> list[float]:
        """The target FPRs this calibration holds a threshold for."""
        return [p.target_fpr for p in self.points]

    def point(self, fpr: float | None = None) -> OperatingPoint:
        """The operating point at target FPR ``fpr`` (None: the default one, ``target_fpr``); a clear error
        naming the points it holds otherwise."""
        if fpr is None:
            fpr = self.target_fpr
        for p in self.points:
            if math.isclose(p.target_fpr, fpr, rel_tol=1e-6):
                return p
        raise ValueError(
            f"the calibration of {self.model} holds thresholds for FPR {', '.join(map(fpr_label, self.fprs))}, not "
            f"{fpr_label(fpr)}: pick one of those, or recalibrate with it (explainer calibrate --fprs ...)")

    def score(self, signals: dict[str, np.ndarray]) -> np.ndarray:
        """The combined anomaly score: the max (or, with ``combine="sum"``, the sum) of the signals' tail scores,
        each times its weight."""
        tails = [self.signal_weights.get(name, 1.0) * ref.tail_score(self.values(name, signals[name]))
                 for name, ref in self.signals.items()]
        return np.sum(tails, axis=0) if self.combine == "sum" else np.max(tails, axis=0)

    def values(self, name: str, measured: np.ndarray) -> np.ndarray:
        """Signal ``name``'s (N,) values: as measured, or a fitted signal's vectors through its fitted state."""
        measured = np.asarray(measured)
        if measured.ndim == 2 and name in self.fitted:
            return SIGNALS[name].apply(measured, self.fitted[name])
        return measured

    def save(self, path: str | Path) -> None:
        data = {"version": CALIBRATION_VERSION, **asdict(self)}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file of any version (1: no ``version`` key, its config in version 1's layout)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        data = dict(data)
        version = data.pop("version", 1)
        if version > CALIBRATION_VERSION:
            raise ValueError(f"calibration version {version} is newer than this explainer reads "
                             f"({CALIBRATION_VERSION}): upgrade explainer")
        if version == 1 and data.get("config"):
            data["config"] = DetectorConfig.from_dict(data["config"]).to_dict()
        data["signals"] = {k: SignalReference(**v) for k, v in data["signals"].items()}
        return cls(**data)


def _references(signals: dict[str, np.ndarray], rows: np.ndarray, use: tuple[str, ...], tails: dict[str, str]):
    levels = np.linspace(0.0, 1.0, N_QUANTILES)
    return {
        name: SignalReference(
            quantiles=[round(float(v), 7) for v in np.quantile(np.asarray(signals[name])[rows], levels)],
            tails=tails[name], n=len(rows),
        )
        for name in use
    }


def fit_calibration(
    signals: dict[str, np.ndarray], target_fpr: float, *, model: str, method: str, entropy: str, images: str,
    config: dict | None = None, use: tuple[str, ...] = ("prediction_shift", "map_shift"),
    confidence: float | None = None,
    tails: dict[str, str] | None = None, folds: int | None = None, fprs: tuple[float, ...] = (),
    drop_unsupported: bool = False, combine: str = "max", signal_weights: dict[str, float] | None = None,
    groups: np.ndarray | None = None,
) -> Calibration:
    """Fit reference CDFs on one half of the clean images (alternate rows) and the threshold on the other: the
    conformal quantile of those m held-out scores, the ⌈(1 - target)(m + 1)⌉-th smallest, so that a new clean
    image scores above it with probability at most the target (the plain (1 - target) quantile overshoots it by
    about 1/m); or so that the target holds with ``confidence`` for the true FPR
    of this threshold (:func:`allowed_exceedances`).
    ``tails`` overrides the registered tails of some signals ("upper" or "two-sided"; validation searches only).

    ``folds=K`` cross-fits instead, for small calibration sets: each image is scored against CDFs fitted on the
    other K-1 folds (rows ``i % K``), the threshold is set on all n of those out-of-fold scores, and the stored
    CDFs are fitted on all n images. Every image then serves both purposes, so the CDFs' tails and the threshold
    rest on about twice the images of the split in halves (the price: the CDFs used at detection time are not
    exactly the ones the threshold was set with, but fitted on n images rather than n (K-1) / K).

    ``fprs``: more operating points, each thresholded the same way on the same held-out scores; ``target_fpr``
    is the default one. A point needs enough held-out scores (:func:`threshold_at`), or it is refused; with
    ``drop_unsupported`` such a point of ``fprs`` is left out instead (the default point never is).

    ``combine``: "max" or "sum" of the signals' tail scores, each times its entry in ``signal_weights`` (absent: 1;
    a weight is finite and non-negative, so that every signal still only adds evidence of "unlike clean").

    ``groups``: one label per image (the camera or source it came from). Each point's threshold is then the
    largest of the conformal thresholds of all the held-out scores and of each group's own, over the groups with
    enough held-out scores for that point: the target holds on every such group, not only on the mix (where a
    source with higher clean scores would exceed it while the others stay below)."""
    tails = {**{name: s.tails for name, s in SIGNALS.items()}, **(tails or {})}
    if combine not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {combine!r}; use one of {', '.join(COMBINE_RULES)}")
    weights = {name: float(w) for name, w in (signal_weights or {}).items()}
    if stray := set(weights) - set(use):
        raise ValueError(f"weights for signals the calibration does not score: {', '.join(sorted(stray))}")
    if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or (use and not any(
            weights.get(name, 1.0) for name in use)):
        raise ValueError(f"signal weights are finite, non-negative and not all zero, got {weights}")
    if unknown := {t for t in tails.values()} - {"upper", "two-sided"}:
        raise ValueError(f"unknown tails {sorted(unknown)}; use upper or two-sided")
    n = len(next(iter(signals.values())))
    if n < 20:
        raise ValueError(f"calibration needs at least 20 clean images, got {n}")
    if folds is not None and not 2 <= folds <= n // 10:
        raise ValueError(f"folds must be between 2 and n/10 = {n // 10}, got {folds}")
    if folds is not None and confidence is not None:
        raise ValueError("confidence needs the split in halves (its binomial bound holds for scores from the very "
                         "CDFs used at detection time, which cross-fitted scores are not): drop folds or confidence")
    rows = np.arange(n)
    signals, fitted = fit_signals(signals, use, config, folds or 2)
    ref_rows, thr_rows = (rows[::2], rows[1::2]) if folds is None else (rows, rows)
    cal = Calibration(
        model=model, method=method, entropy=entropy, target_fpr=target_fpr, threshold=0.0,
        n_reference=len(ref_rows), n_threshold=len(thr_rows), threshold_fpr=0.0, images=images,
        signals=_references(signals, ref_rows, use, tails), config=config or {}, combine=combine,
        signal_weights=weights, fitted=fitted,
    )
    if folds is None:
        held_out = cal.score({k: np.asarray(v)[thr_rows] for k, v in signals.items()})
    else:
        held_out = np.empty(n)
        for k in range(folds):
            inside = rows % folds == k
            fold = replace(cal, signals=_references(signals, rows[~inside], use, tails))
            held_out[inside] = fold.score({name: np.asarray(v)[inside] for name, v in signals.items()})
        cal.folds = folds
    cal.confidence = confidence
    cal.points = []
    held_groups = None
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        if len(groups) != n:
            raise ValueError(f"groups: one label per calibration image, got {len(groups)} for {n}")
        held_groups = groups[thr_rows]
        cal.groups = {str(g): int(c) for g, c in zip(*np.unique(groups, return_counts=True), strict=True)}
    for fpr in sorted({target_fpr, *fprs}, reverse=True):
        try:
            cal.points.append(threshold_at(held_out, fpr, confidence, held_groups))
        except ValueError:
            if not drop_unsupported or math.isclose(fpr, target_fpr):
                raise
    default = cal.point(target_fpr)
    cal.threshold, cal.threshold_fpr = default.threshold, default.threshold_fpr
    return cal


def fit_signals(signals: dict[str, np.ndarray], use: tuple[str, ...], config: dict | None,
                folds: int) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Each fitted signal of ``use``: its state fitted on all the clean images' vectors, and in ``signals`` its
    values cross-fitted over ``folds`` folds (rows ``i % folds``: each image's value from a state fitted without
    it), so that the CDFs and the threshold see the values a new clean image gets, not those of images a state
    was fitted on (a principal subspace fits its own images' spread: their distances are not a new image's)."""
    params = DetectorConfig.from_dict(config) if config else None
    out, fitted = dict(signals), {}
    for name in use:
        sig = SIGNALS[name]
        if not sig.fitted:
            continue
        vectors = np.asarray(signals[name])
        if vectors.ndim != 2:
            raise ValueError(f"{name} is fitted on per-image vectors, got an array of shape {vectors.shape}")
        p = params.params(name) if params and params.uses(name) else sig.make_params()
        rows = np.arange(len(vectors))
        values = np.empty(len(vectors))
        for k in range(folds):
            inside = rows % folds == k
            values[inside] = sig.apply(vectors[inside], sig.fit(vectors[~inside], p))
        out[name], fitted[name] = values, sig.fit(vectors, p)
    return out, fitted


def threshold_at(held_out: np.ndarray, target_fpr: float, confidence: float | None = None,
                 groups: np.ndarray | None = None) -> OperatingPoint:
    """The operating point at ``target_fpr`` from m out-of-sample clean scores: their conformal quantile, the
    ⌈(1 - target)(m + 1)⌉-th smallest, or with ``confidence`` the threshold that leaves
    :func:`allowed_exceedances` scores above it. Refused when m is too small for the target (the quantile
    would lie beyond the largest score, and any threshold there is a guess). ``groups`` (a label per score):
    the largest of that threshold and each group's own, over the groups large enough for the target."""
    point = _threshold(held_out, target_fpr, confidence)
    if groups is not None:
        for g in np.unique(groups):
            try:
                own = _threshold(held_out[groups == g], target_fpr, confidence)
            except ValueError:
                continue  # too few of this group for the target: the pooled threshold alone covers it
            if own.threshold > point.threshold:
                point = OperatingPoint(target_fpr, own.threshold, float(np.mean(held_out > own.threshold)))
    return point


def _threshold(held_out: np.ndarray, target_fpr: float, confidence: float | None) -> OperatingPoint:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"a target FPR lies in (0, 1), got {target_fpr}")
    m = len(held_out)
    if confidence is None:
        rank = math.ceil((1.0 - target_fpr) * (m + 1))
        if rank > m:
            raise ValueError(
                f"{m} held-out clean scores cannot set a threshold at FPR {fpr_label(target_fpr)}: its conformal "
                f"quantile needs at least {math.ceil(1.0 / target_fpr) - 1}; calibrate on more clean images or drop "
                "that operating point")
        threshold = float(np.sort(held_out)[rank - 1])
    else:
        threshold = float(np.sort(held_out)[::-1][allowed_exceedances(m, target_fpr, confidence)])
    return OperatingPoint(target_fpr, threshold, float(np.mean(held_out > threshold)))


def allowed_exceedances(n: int, target_fpr: float, confidence: float) -> int:
    """The most held-out clean images that may score above the threshold for the FPR to be at most
    ``target_fpr`` with ``confidence``: the largest k with P(Binomial(n, target_fpr) <= k) <= 1 - confidence.

    A threshold at the plain (1 - target) quantile has an *expected* FPR of the target, and its true FPR
    scatters around it; this one exceeds the target only with probability 1 - confidence."""
    if not (0.0 < confidence < 1.0 and 0.0 < target_fpr < 1.0):
        raise ValueError(f"confidence and target_fpr must be in (0, 1), got {confidence} and {target_fpr}")
    log_p, log_q = math.log(target_fpr), math.log1p(-target_fpr)
    cdf, k = 0.0, -1
    for i in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
                        + (n - i) * log_q)
        if cdf > 1.0 - confidence:
            break
        k = i
    if k < 0:
        raise ValueError(f"{n} held-out images are too few to bound the FPR at {target_fpr} with confidence "
                         f"{confidence}: calibrate on more clean images")
    return k
