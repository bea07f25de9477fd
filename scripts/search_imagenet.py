"""Choose the ImageNet detector's signals on the even-positioned photos only (never the evaluation ones).

Split, as in scripts/probe_imagenet.py: the even photos at even positions of that list (125) are the calibration
photos (clean) and train the universal patch; the other 125 even photos are the validation photos, clean and
attacked (patch, BIM, PGD at the evaluation's parameters). For each candidate configuration the signals are
computed once; each candidate set of signals is calibrated at 5% FPR on the calibration photos only and reported
as validation FPR and detection rate / ROC-AUC per attack. Writes reports/imagenet_validation_search.md.

Run: python scripts/search_imagenet.py [--patch-steps 200]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.calibration import fit_calibration
from pipeline.detector import Detector
from pipeline.evaluate_imagenet import IMAGENET_CONFIG, even_photo_validation
from pipeline.evaluation import roc_auc
from pipeline.models import load_model

OUT = Path(__file__).resolve().parents[1] / "reports" / "imagenet_validation_search.md"
CONFIGS = {
    "saliency, NLM h=10 (the evaluated configuration)": IMAGENET_CONFIG,
    "Grad-CAM, NLM h=10, occlusion of the top 5%": replace(IMAGENET_CONFIG, method="gradcam", occlusion=0.05),
}
SIGNAL_SETS = (
    ("prediction_shift", "map_shift"),
    ("entropy_original", "occlusion_shift"),
    ("occlusion_shift",),
    ("entropy_original", "occlusion_shift", "prediction_shift"),
    ("entropy_original", "occlusion_shift", "prediction_shift", "map_shift"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch-steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mobilenet_v2")
    cal_images, val_images, runs = even_photo_validation(model, ("patch", "bim", "pgd"), args.patch_steps)
    sets = {"clean": val_images, **{name: run.images for name, run in runs.items()}}
    attacks = [k for k in sets if k != "clean"]
    lines = ["# ImageNet validation search (even-positioned photos only)", "", __doc__.split("\n\n")[1], "",
             f"Command: `python scripts/search_imagenet.py --patch-steps {args.patch_steps}`. Validation: "
             f"{len(val_images)} clean photos; adversarials: " + ", ".join(f"{k} {len(sets[k])}" for k in attacks), ""]
    for label, config in CONFIGS.items():
        det = Detector(model, config)
        t = time.perf_counter()
        cal = det.analyse_many(cal_images, batch_size=16)
        ms = 1000 * (time.perf_counter() - t) / len(cal_images)
        val = {k: det.analyse_many(v, batch_size=16) for k, v in sets.items()}
        lines += [f"## {label} ({ms:.0f} ms per detection)", "",
                  "| signals | validation FPR | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
        for use in SIGNAL_SETS:
            if any(s not in cal for s in use):
                continue
            c = fit_calibration(cal, 0.05, model="mobilenet_v2", method=config.method, entropy=config.entropy,
                                images="", use=use)
            score = {k: c.score(v) for k, v in val.items()}
            cells = [f"{np.mean(score[k] > c.threshold):.1%} / {roc_auc(score['clean'], score[k]):.3f}"
                     for k in attacks]
            lines.append(f"| {', '.join(use)} | {np.mean(score['clean'] > c.threshold):.1%} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        print(label, "done", flush=True)
    lines.append(f"Run time {(time.perf_counter() - start) / 60:.1f} min.")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
