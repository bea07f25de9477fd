"""Choose the detector configuration on a validation split of the even-indexed MNIST test digits.

Run: python scripts/search_config.py [--out PATH] [method:steps:h[:template:search[:median[:squeeze]]]] ...]
(default: ig:8:30 ig:8:50 ig:4:50 ig:4:70; NLM template 5, search window 11 and no median filter unless given;
``median`` filters before NLM (NLMParams.pre_median), ``squeeze`` > 0 adds the median_shift signal of a
squeeze×squeeze median filter)
Writes reports/validation/mnist_validation_search.md, or PATH. The odd-indexed digits (the evaluation split) are
never read.

Split: of the 5,000 even-indexed test digits, every 10th (500 digits, spread over both halves of the test set,
whose writers differ) is the validation set; the other 4,500 calibrate. Adversarials (PGD, BIM, MIM, CW-L∞,
CW-L2, CW-L0 at their default parameters) are made from the first 300 validation digits (150 for CW-L0).
For every configuration and every candidate set of signals, the score is calibrated at 5% FPR on the
calibration digits only and reported as detection rate / ROC-AUC on the validation digits.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from evaluation.attacks import ATTACKS
from evaluation.datasets import PROJECT_ROOT, load_test_digits
from evaluation.metrics import roc_auc, run_attack
from pipeline import Detector, DetectorConfig, ExplainParams, NLMParams, load_model
from pipeline.calibration import fit_calibration

SIGNAL_SETS = (
    ("entropy_original", "entropy_denoised", "entropy_change", "prediction_shift"),
    ("entropy_original", "prediction_shift"),
    ("prediction_shift", "map_shift"),
    ("entropy_original", "prediction_shift", "map_shift"),
)
ALL_SIGNALS = ("entropy_original", "entropy_denoised", "entropy_change", "prediction_shift", "map_shift")
SQUEEZE_SETS = (
    ("prediction_shift", "map_shift", "median_shift"),
    ("median_shift",),
)


def signals(det: Detector, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every signal ``det`` measures on ``images``: the base signals (entropy_change among them) and those its
    configuration names."""
    return det.analyse_many(images, batch_size=256)


VALIDATION_ATTACKS = ("pgd", "bim", "mim", "cw-linf", "cw-l2", "cw-l0")


def validation_split(model) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The calibration digits and the validation sets (clean, then each attack's successful adversarials) of the
    split in this module's docstring; even-indexed test digits only."""
    even = load_test_digits().parity("even")
    is_val = np.arange(len(even.images)) % 10 == 0
    cal_images, val_images, val_labels = even.images[~is_val], even.images[is_val], even.labels[is_val]
    sets = {"clean": val_images}
    for name in VALIDATION_ATTACKS:
        k = 150 if name == "cw-l0" else 300
        sets[name] = run_attack(model, name, ATTACKS[name](), val_images[:k], val_labels[:k]).images
        print(f"{name}: {len(sets[name])} validation adversarials", flush=True)
    return cal_images, sets


def describe(sets: dict[str, np.ndarray]) -> str:
    """One report line: how many validation digits and adversarials of each attack there are."""
    return (f"Validation: {len(sets['clean'])} clean digits; adversarials: "
            + ", ".join(f"{k} {len(v)}" for k, v in sets.items() if k != "clean"))


def main(specs: list[str], out_path: str = "") -> None:
    torch.manual_seed(0)
    model = load_model("mnist")
    cal_images, sets = validation_split(model)
    lines = ["# Validation search (even-indexed digits only)", "", __doc__.strip(), "", describe(sets), ""]
    for spec in specs:
        method, steps, h, *window = spec.split(":")
        template, search, median, squeeze = ([int(w) for w in window] + [0, 0])[:4] if window else (5, 11, 0, 0)
        nlm = NLMParams(h=float(h), h_color=float(h), template=template, search=search, pre_median=median)
        measured = {"prediction_shift": {}, **({"median_shift": {"size": squeeze}} if squeeze else {})}
        det = Detector(model, DetectorConfig(method=method, explain=ExplainParams(steps=int(steps)), nlm=nlm,
                                             signals=measured))
        names = ALL_SIGNALS + (("median_shift",) if squeeze else ())
        start = time.perf_counter()
        cal = signals(det, cal_images)
        per_image_ms = 1000 * (time.perf_counter() - start) / len(cal_images)
        val = {k: signals(det, v) for k, v in sets.items()}
        lines += [f"## {method}, {steps} steps, NLM h={h} template {template} search {search}"
                  + (f" after a {median}×{median} median" if median else "")
                  + (f", median_shift of a {squeeze}×{squeeze} median" if squeeze else "")
                  + f" ({per_image_ms:.1f} ms per detection)", "",
                  "ROC-AUC of each signal alone (max(AUC, 1-AUC)):", "",
                  "| attack | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in sets:
            if k != "clean":
                aucs = [roc_auc(val["clean"][s], val[k][s]) for s in names]
                lines.append(f"| {k} | " + " | ".join(f"{max(a, 1 - a):.3f}" for a in aucs) + " |")
        lines += ["", "Combined score (max of tail scores), calibrated at 5% FPR on the calibration digits:", "",
                  "| signals | validation FPR | " + " | ".join(k for k in sets if k != "clean") + " |",
                  "|---|---|" + "---|" * (len(sets) - 1)]
        for use in SIGNAL_SETS + (SQUEEZE_SETS if squeeze else ()):
            c = fit_calibration(cal, 0.05, model="mnist", method=method, entropy="spatial", images="", use=use)
            score = {k: c.score(v) for k, v in val.items()}
            cells = [f"{np.mean(score[k] > c.threshold):.1%} / {roc_auc(score['clean'], score[k]):.3f}"
                     for k in sets if k != "clean"]
            lines.append(f"| {', '.join(use)} | {np.mean(score['clean'] > c.threshold):.1%} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        print(f"done {spec}", flush=True)
    out = PROJECT_ROOT / (out_path or "reports/validation/mnist_validation_search.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    out_arg = args[args.index("--out") + 1] if "--out" in args else ""
    specs = [a for a in args if a not in ("--out", out_arg)]
    main(specs or ["ig:8:30", "ig:8:50", "ig:4:50", "ig:4:70"], out_arg)
