"""The decision: what the CPU stage after explanation needs of a detector, its config and calibration, and no
network. :class:`Decider` measures the base signals from the 2N predictions and maps, combines every signal into
the calibrated score and decides at an operating point; a :class:`pipeline.Detector` decides through one, and the
Serve app's Scorer holds only these (it never loads a model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.calibration import Calibration
from pipeline.config import DetectorConfig
from pipeline.signals import SIGNALS, MapsPass

RULES = ("calibrated", "sign")
# the signals every detection measures (cheap, from the 2N predictions and maps): every verdict carries them
BASE_SIGNALS = tuple(name for name, s in SIGNALS.items() if s.stage == "maps")


@dataclass
class Explained:
    """What the explanation stage hands on: softmax outputs (2N, K) and maps (2N, C, H, W), originals first, and
    the configured ``model`` signals of the originals (name -> (N,))."""

    probs: np.ndarray
    maps: np.ndarray
    signals: dict[str, np.ndarray] = field(default_factory=dict)

    def part(self, a: int, b: int) -> Explained:
        """The images a..b of the batch (their originals and their denoised copies)."""
        n = len(self.probs) // 2
        rows = np.r_[a:b, n + a : n + b]
        return Explained(probs=self.probs[rows], maps=self.maps[rows],
                         signals={k: v[a:b] for k, v in self.signals.items()})

    @classmethod
    def concat(cls, parts: list[Explained]) -> Explained:
        """The batch made of ``parts`` in order (the inverse of :meth:`part`): originals first, then copies."""
        halves = [len(p.probs) // 2 for p in parts]

        def both(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate([a[:n] for a, n in zip(arrays, halves, strict=True)]
                                  + [a[n:] for a, n in zip(arrays, halves, strict=True)])

        return cls(probs=both("probs"), maps=both("maps"),
                   signals={k: np.concatenate([p.signals[k] for p in parts]) for k in parts[0].signals})


@dataclass
class DetectionResult:
    """Per-image arrays over the batch, the threshold and rule that produced ``is_adversarial`` (and the
    operating point's target FPR, ``fpr``: None under the sign rule), and every signal measured (name -> (N,)):
    the base signals always, the configured ``model`` signals when measured (a fitted one once calibrated)."""

    predicted_class: np.ndarray
    confidence: np.ndarray
    denoised_class: np.ndarray
    score: np.ndarray
    is_adversarial: np.ndarray
    threshold: float
    rule: str
    signals: dict[str, np.ndarray]
    maps: np.ndarray | None = None  # attribution maps of the originals (N, H, W), when asked for
    fpr: float | None = None

    def __len__(self) -> int:
        return len(self.score)

    def rows(self) -> list[dict]:
        """One plain-Python dict per image (for JSON and the wire): classes, score, verdict and every signal."""
        cols = {name: getattr(self, name).tolist()
                for name in ("predicted_class", "confidence", "denoised_class", "score", "is_adversarial")}
        cols.update({name: v.tolist() for name, v in self.signals.items()})
        return [{**{k: v[i] for k, v in cols.items()}, "threshold": self.threshold, "rule": self.rule,
                 "fpr": self.fpr} for i in range(len(self))]



@dataclass
class Decider:
    """Detector ``name``'s config and calibration, deciding at operating point ``fpr`` (None: the calibration's
    default)."""

    name: str
    config: DetectorConfig
    calibration: Calibration | None = None
    fpr: float | None = None

    def use_operating_point(self, fpr: float | None) -> Decider:
        """Decide at the calibration's threshold for target FPR ``fpr`` from now on (None: its default one);
        refused, naming the points it holds, when the calibration has none for ``fpr``."""
        if fpr is not None:
            if self.calibration is None:
                raise ValueError(f"detector {self.name} has no calibration, so it has no operating points")
            self.calibration.point(fpr)
        self.fpr = fpr
        return self

    def measure(self, explained: Explained) -> dict[str, np.ndarray]:
        """Per-image classes and signals: the base signals from the maps and predictions (the CPU stage after
        explanation), and the ``model`` signals the explanation stage measured."""
        probs = explained.probs
        n = len(probs) // 2
        batch = MapsPass(probs=probs, maps=torch.from_numpy(explained.maps), entropy=self.config.entropy)
        cal = self.calibration
        return {
            "predicted_class": probs[:n].argmax(1),
            "confidence": probs[:n].max(1).astype(np.float64),
            "denoised_class": probs[n:].argmax(1),
            **{name: SIGNALS[name].compute(batch, None) for name in BASE_SIGNALS},
            # a fitted signal's vectors become its values once a calibration holds its state; before, they stay
            # vectors, which calibration fits on
            **{name: cal.values(name, v) if cal else v for name, v in explained.signals.items()},
        }

    def decide(self, explained: Explained, rule: str | None = None, return_maps: bool = False,
               fpr: float | None = None) -> DetectionResult:
        """Entropy and decision (the CPU stage after explanation). ``rule``: "calibrated" (the default) or
        "sign" (the paper's: adversarial when entropy did not decrease; it flags most clean images of some
        models, so it is used only when asked for by name). ``fpr``: the calibration's operating point to
        decide at (None: :attr:`fpr`, by default the calibration's own target)."""
        rule = rule or "calibrated"
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        s = self.measure(explained)
        if rule == "sign":
            score, threshold = s["entropy_change"], 0.0
            flagged = score >= 0
        else:
            if self.calibration is None:
                raise ValueError(
                    f"detector {self.name} has no calibration, so it cannot decide with the calibrated rule: "
                    "calibrate it on clean images (explainer calibrate --images-dir CLEAN --out BUNDLE, or "
                    "detector.calibrate(clean_images)) or load a calibrated bundle; the paper's sign rule, which "
                    "flags most clean images of some models, only when asked for by name (rule='sign')")
            if missing := [k for k in self.calibration.signals if k not in s]:
                hint = (" (the transplant check needs its clean host images, which calibration picks and stores: "
                        "calibrate with the transplant on, or load such a calibration)"
                        if "transplant_gain" in missing else "")
                raise ValueError(f"the calibration scores {', '.join(missing)}, which this detector's configuration "
                                 f"does not measure{hint}")
            point = self.calibration.point(self.fpr if fpr is None else fpr)
            score, threshold = self.calibration.score(s), point.threshold
            flagged = score > threshold
        n = len(score)
        classes = ("predicted_class", "confidence", "denoised_class")
        return DetectionResult(
            **{k: s[k] for k in classes}, score=np.asarray(score, dtype=np.float64),
            is_adversarial=np.asarray(flagged, dtype=bool), threshold=float(threshold), rule=rule,
            fpr=None if rule == "sign" else point.target_fpr,
            signals={k: v for k, v in s.items() if k not in classes and np.ndim(v) == 1},
            maps=explained.maps[:n].sum(1) if return_maps else None,
        )
