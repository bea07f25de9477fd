"""Choose the photo detector's signals and how they combine, from the validation study's cache
(``scripts/photo_signal_study.py``); writes reports/validation/photo_signal_choice.md.

Validation photos only. The clean photos are split by row parity: even rows fit each signal's clean distribution
(the calibration's quantile CDFs, as :mod:`pipeline.calibration` fits them, and feature_distance's Gaussian), odd
rows set the thresholds (the clean 99th and 99.9th percentiles of their scores). The attacked photos are split by
parity too: even rows choose, odd rows report. Per signal alone: ROC-AUC and detection at both points. Then
combinations of the tail scores: the previous photo preset (the max of its four), unit-weight sums of candidate
sets, and a weighted sum whose non-negative weights (from {0, 0.5, 1, 2, 4}) are searched, by coordinate ascent,
to maximise how much of each attack's goal at the 1% point is met on the choosing rows.
Usage: ``python scripts/photo_signal_choice.py [--cache /tmp/photo_signal_study]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.metrics import roc_auc  # noqa: E402
from pipeline.calibration import _references  # noqa: E402
from pipeline.presets import preset  # noqa: E402
from pipeline.signals import SIGNALS, ChromaParams, FeatureParams  # noqa: E402

CHOSEN = tuple(preset("photos").signals)

ATTACKS = ("pgd", "pgd-2", "bim-early", "cw-l2", "patch")
# candidates and the tail that is unusual for a clean photo
TAILS = {
    "occlusion_shift": "two-sided", "prediction_shift": "upper", "activation_norm": "upper",
    "transplant_gain": "upper", "map_shift": "upper", "entropy_original": "two-sided",
    "noise_shift": "upper", "denoise_residual": "upper", "confidence": "upper", "margin": "upper",
    "energy": "two-sided", "boundary_distance": "upper", "step_shift_0.5": "upper", "step_shift_1": "upper",
    "step_shift_2": "upper", "step_drop_1": "upper", "feature_distance": "upper", "chroma_residual": "upper",
}
# the registered signals the weights are searched over (the others above were studied and not registered: the
# energy and the margin add nothing feature_distance does not, the gradient steps cost a backward pass for little)
SEARCHED = ("occlusion_shift", "prediction_shift", "activation_norm", "transplant_gain", "map_shift", "noise_shift",
            "denoise_residual", "feature_distance", "chroma_residual")
PREVIOUS = ("occlusion_shift", "prediction_shift", "activation_norm", "transplant_gain")  # max of these before
# unit-weight sums compared with the chosen one (the photo preset's signals, pipeline.presets)
SETS = {
    "the previous four": PREVIOUS,
    "the chosen five and occlusion_shift": (*CHOSEN, "occlusion_shift"),
    "the chosen five and prediction_shift": (*CHOSEN, "prediction_shift"),
    "the chosen five without activation_norm": tuple(k for k in CHOSEN if k != "activation_norm"),
    "feature_distance, chroma_residual, noise_shift, prediction_shift, map_shift": (
        "feature_distance", "chroma_residual", "noise_shift", "prediction_shift", "map_shift"),
}
GRID = (0.0, 0.5, 1.0, 2.0, 4.0)
# the goals at the 1% point the search aims at (the photo goals of docs/method.md)
GOALS = {"pgd": 0.95, "pgd-2": 0.85, "bim-early": 0.80, "cw-l2": 0.80, "patch": 0.95}


@dataclass
class Pixels:
    """What a pixel-only registered signal reads of a batch (pipeline.signals.ModelPass): the originals."""

    both: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.both)


def load(cache: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The cached values, with the registered signals the study did not measure computed here: feature_distance
    (its Gaussian fitted on the clean photos' even rows, the rows that fit the clean distributions) and
    chroma_residual (from the cached pixels)."""
    clean = dict(np.load(cache / "clean.npz"))
    attacks = {name: dict(np.load(cache / f"{name}.npz")) for name in ATTACKS if (cache / f"{name}.npz").exists()}
    features, chroma = SIGNALS["feature_distance"], SIGNALS["chroma_residual"]
    state = features.fit(clean["features"][0::2], FeatureParams())
    for d in (clean, *attacks.values()):
        d["feature_distance"] = features.apply(d["features"], state)
        x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 255
        d["chroma_residual"] = np.concatenate([chroma.compute(Pixels(x[i : i + 64]), ChromaParams())
                                               for i in range(0, len(x), 64)])
    return clean, attacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/photo_signal_study"))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "validation" / "photo_signal_choice.md")
    args = ap.parse_args()
    clean, attacks = load(args.cache)
    names = [n for n in TAILS if n in clean]
    n = len(clean["confidence"])
    refs = _references(clean, np.arange(n)[0::2], tuple(names), TAILS)
    tail = {"clean": {k: refs[k].tail_score(clean[k])[1::2] for k in names}}
    for a, d in attacks.items():
        tail[a] = {k: refs[k].tail_score(d[k]) for k in names}

    def rates(score_clean: np.ndarray, score_adv: dict[str, np.ndarray], rows: slice) -> dict[str, tuple]:
        t1, t01 = np.quantile(score_clean, 0.99), np.quantile(score_clean, 0.999)
        return {a: (roc_auc(score_clean, s[rows]), float((s[rows] > t1).mean()), float((s[rows] > t01).mean()))
                for a, s in score_adv.items()}

    lines = [
        "# Validation: signals and their weights for photos",
        "",
        f"`python scripts/photo_signal_study.py && python scripts/photo_signal_choice.py`. Validation photos only "
        f"(scripts/photo_signal_study.py says which): {n} clean photos (even rows fit the clean distributions, the "
        f"{len(tail['clean']['confidence'])} odd rows set the 1% and 0.1% thresholds: with this many the 0.1% one "
        "rests on the largest few), and the successful adversarials of each attack ("
        + ", ".join(f"{a} {len(d['confidence'])}" for a, d in attacks.items())
        + "; even rows choose the weights, odd rows report). Cells: ROC-AUC / detection at the clean 99th / "
        "99.9th percentile, on the odd (reporting) adversarials.",
        "",
        "| signal | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    report = slice(1, None, 2)
    for k in names:
        r = rates(tail["clean"][k], {a: tail[a][k] for a in attacks}, report)
        lines.append(f"| {k} | " + " | ".join(f"{v[0]:.3f} / {v[1]:.0%} / {v[2]:.0%}" for v in r.values()) + " |")

    def combined(use: tuple[str, ...], weights: tuple[float, ...], rule: str) -> dict[str, np.ndarray]:
        out = {}
        for key, t in tail.items():
            stack = np.stack([w * t[k] for k, w in zip(use, weights, strict=True)])
            out[key] = stack.max(0) if rule == "max" else stack.sum(0)
        return out

    def mean_detection(scores: dict[str, np.ndarray], rows: slice) -> float:
        t1 = np.quantile(scores["clean"], 0.99)
        return float(np.mean([(scores[a][rows] > t1).mean() for a in attacks]))

    def attainment(scores: dict[str, np.ndarray], rows: slice) -> float:
        """The mean share of each attack's goal at the 1% point that is met (a rate past its goal counts as
        the goal): no attack's gain pays for another's loss beyond its goal."""
        t1 = np.quantile(scores["clean"], 0.99)
        return float(np.mean([min((scores[a][rows] > t1).mean(), GOALS[a]) / GOALS[a] for a in attacks]))

    choose = slice(0, None, 2)
    candidates = [k for k in names if k in SEARCHED]
    # coordinate ascent over the grid from the preset's sum, a few sweeps (the full grid is 4^17)
    weights = {k: (1.0 if k in CHOSEN else 0.0) for k in candidates}
    best = attainment(combined(tuple(weights), tuple(weights.values()), "sum"), choose)
    for _ in range(4):
        improved = False
        for k, w in itertools.product(candidates, GRID):
            trial = {**weights, k: w}
            if not any(trial.values()):
                continue
            m = attainment(combined(tuple(trial), tuple(trial.values()), "sum"), choose)
            if m > best + 1e-9:
                best, weights, improved = m, trial, True
        if not improved:
            break
    chosen = {k: w for k, w in weights.items() if w}
    lines += ["", "## Combinations", "",
              "Detection on the reporting rows; the weights were searched on the choosing rows.", "",
              "| combination | " + " | ".join(attacks) + " | mean @1% |", "|---|" + "---|" * (len(attacks) + 1)]
    rows = [("max of the previous four (the preset before)", PREVIOUS, (1.0,) * len(PREVIOUS), "max"),
            ("**sum of " + ", ".join(CHOSEN) + " (chosen)**", CHOSEN, (1.0,) * len(CHOSEN), "sum")]
    rows += [(f"sum of {label}", use, (1.0,) * len(use), "sum") for label, use in SETS.items()]
    rows.append(("weighted sum " + ", ".join(f"{w:g}×{k}" for k, w in chosen.items()) + " (searched)",
                 tuple(chosen), tuple(chosen.values()), "sum"))
    for label, use, w, rule in rows:
        s = combined(use, w, rule)
        r = rates(s["clean"], {a: s[a] for a in attacks}, report)
        lines.append(f"| {label} | " + " | ".join(f"{v[0]:.3f} / {v[1]:.0%} / {v[2]:.0%}" for v in r.values())
                     + f" | {mean_detection(s, report):.1%} |")
    lines += ["", "The chosen sum meets the goals of PGD at 8/255 and 2/255 here and holds the patch near its goal; "
              "no combination comes near the goals for BIM stopped at its first success or CW-L2, which end just "
              "past the decision boundary and move little else. The chosen set was picked among these unit-weight "
              "sums by reading every validation row (all of them validation photos; the evaluation photos were "
              "never read). The weight search, on the choosing rows, moves the mean at the 1% point by about a "
              "point on the reporting rows: a few photos of the small sets (the patch's 78, the CW-L2's 63), not "
              "a difference to choose by, so every signal weighs 1.", ""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
