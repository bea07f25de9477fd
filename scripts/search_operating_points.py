"""Choose the MNIST detector's signals and how they combine for low false-positive rates, on validation digits.

Run: python scripts/search_operating_points.py [--out PATH]
Writes reports/validation/mnist_operating_points_search.md, or PATH. The odd-indexed test digits (the evaluation
split) are never read.

Split: the 1,262 training digits the model was not trained on (13,000..14,261) give the validation digits: the
first 500 are attacked; the rest, with the 5,000 even-indexed test digits, calibrate (CDFs from one half, the
thresholds from the other, conformal in expectation: enough held-out scores for 0.1%). Adversarials: every
attack of the evaluation that does not know the detector (BIM, MIM, PGD-L∞ at ε 0.3 and 0.1, CW-L0/L2/L∞,
PGD-L2 and the black-box Square attack where registered), made from the validation digits, quantised to uint8,
kept when they still fool the model. Each candidate (a set of signals and a combination rule) is reported as
detection at 5%, 1% and 0.1% on the validation adversarials; the candidate chosen is the one with the best
worst-case detection at 1%, ties broken at 0.1%.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import numpy as np
import torch

from evaluation.attacks import ATTACKS, PGD
from evaluation.datasets import HELD_OUT_TRAIN_START, PROJECT_ROOT, load_mnist, load_test_digits
from evaluation.metrics import run_attack
from pipeline import Detector, load_model, preset
from pipeline.calibration import fit_calibration

FPRS = (0.05, 0.01, 0.001)
N_ATTACKED = 500
BASE = ("prediction_shift", "map_shift", "median_shift")
CANDIDATES = (
    (BASE, "max"),
    (BASE, "sum"),
    ((*BASE, "denoise_residual"), "max"),
    ((*BASE, "denoise_residual"), "sum"),
    ((*BASE, "entropy_original"), "max"),
    ((*BASE, "denoise_residual", "entropy_original"), "sum"),
    ((*BASE, "impulse_residual"), "max"),
    ((*BASE, "denoise_residual", "impulse_residual"), "max"),
    ((*BASE, "denoise_residual", "impulse_residual"), "sum"),
    (("prediction_shift", "median_shift", "denoise_residual", "impulse_residual"), "max"),
)


def attacks() -> dict:
    """The attacks that do not know the detector, by report name."""
    table = {name: ATTACKS[name] for name in ("bim", "mim", "pgd", "cw-l0", "cw-l2", "cw-linf", "pgd-l2", "square")
             if name in ATTACKS}
    table["pgd-eps0.1"] = partial(PGD, eps=0.1, alpha=0.01, steps=40, random_start=True)
    return table


def main(out_path: str = "") -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mnist")
    train, train_labels = load_mnist("train")
    held, held_labels = train[HELD_OUT_TRAIN_START:], train_labels[HELD_OUT_TRAIN_START:]
    val_images, val_labels = held[:N_ATTACKED], held_labels[:N_ATTACKED]
    cal_images = np.concatenate([load_test_digits().parity("even").images, held[N_ATTACKED:]])
    config = preset("digits")
    det = Detector(model, type(config)(method=config.method, explain=config.explain, entropy=config.entropy,
                                       nlm=config.nlm, signals={**config.signals, "denoise_residual": {},
                                                "impulse_residual": {"size": 3, "top": 5}}))
    cal = det.analyse_many(cal_images)
    sets = {}
    for name, factory in attacks().items():
        k = 200 if name == "cw-l0" else N_ATTACKED
        run = run_attack(model, name, factory(), val_images[:k], val_labels[:k])
        sets[name] = det.analyse_many(run.images)
        print(f"{name}: {len(run.images)} adversarials of {run.attempted} in {run.seconds:.0f}s", flush=True)
    lines = ["# Operating-point search (validation digits only)", "", __doc__.strip(), "",
             f"Calibration digits: {len(cal_images)}; adversarials: "
             + ", ".join(f"{k} {len(next(iter(v.values())))}" for k, v in sets.items()), ""]
    best = None
    for use, combine in CANDIDATES:
        c = fit_calibration(cal, FPRS[0], model="mnist", method=config.method, entropy=config.entropy, images="",
                            use=use, fprs=FPRS[1:], combine=combine)
        rates = {name: [float(np.mean(c.score(s) > c.point(f).threshold)) for f in FPRS] for name, s in sets.items()}
        worst = tuple(min(r[i] for r in rates.values()) for i in (1, 2))
        lines += [f"## {' + '.join(use)}, combined by {combine}", "",
                  "| attack | " + " | ".join(f"DR @ {100 * f:g}%" for f in FPRS) + " |",
                  "|---|" + "---|" * len(FPRS)]
        lines += [f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in r) + " |" for name, r in rates.items()]
        lines += [f"| **worst** | – | **{100 * worst[0]:.1f}%** | **{100 * worst[1]:.1f}%** |", ""]
        if best is None or worst > best[0]:
            best = (worst, use, combine)
        print(f"{use} {combine}: worst at 1% {worst[0]:.1%}, at 0.1% {worst[1]:.1%}", flush=True)
    lines += ["## Chosen", "", f"{' + '.join(best[1])}, combined by {best[2]}: worst-case detection "
              f"{100 * best[0][0]:.1f}% at 1% FPR and {100 * best[0][1]:.1f}% at 0.1% on the validation "
              f"adversarials. ({(time.perf_counter() - start) / 60:.1f} min)", ""]
    out = PROJECT_ROOT / (out_path or "reports/validation/mnist_operating_points_search.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[args.index("--out") + 1] if "--out" in args else "")
