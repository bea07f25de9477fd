"""A first validation probe for the ImageNet path, on the even-positioned photos only (never the evaluation ones).

Why: with saliency maps the ImageNet evaluation misses every attack (reports/imagenet). This asks, per signal,
how well clean and attacked photos separate (two-sided ROC-AUC) for saliency and IG maps, adding the entropy of
a pooled map (relevance per 16 × 16 region), which should see a patch that holds the relevance.

Split: even photos at even positions of that list (125) train the patch; the other 125 even photos are the
validation photos, clean and attacked (patch, BIM). Writes reports/imagenet_validation_probe.md.

Run: python scripts/probe_imagenet.py [--steps 4] [--patch-steps 200]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.calibration import LEGACY_SIGNALS
from pipeline.configs import IMAGENET_CONFIG
from pipeline.detector import Detector
from pipeline.entropy import map_entropy, map_shift
from pipeline.evaluate_imagenet import even_photo_validation
from pipeline.evaluation import roc_auc
from pipeline.explain import ExplainParams
from pipeline.models import load_model

OUT = Path(__file__).resolve().parents[1] / "reports" / "imagenet_validation_probe.md"


def pooled_entropy(maps: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """Spatial entropy (bits) of |relevance| summed per ``cell`` × ``cell`` region."""
    pooled = F.avg_pool2d(maps.abs().sum(1, keepdim=True), cell)
    p = pooled.flatten(1) / pooled.flatten(1).sum(1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(1)


def signals(det: Detector, images: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for i in range(0, len(images), batch):
        x = det.prepare(images[i : i + batch])
        e = det.explain_pair(x, det.denoise(x))
        n = len(x)
        maps = torch.from_numpy(e.maps)
        ent = map_entropy(maps, "spatial").numpy()
        pe = pooled_entropy(maps).numpy()
        row = {
            "entropy_original": ent[:n], "entropy_change": ent[n:] - ent[:n],
            "pooled_entropy_original": pe[:n], "pooled_entropy_change": pe[n:] - pe[:n],
            "prediction_shift": np.abs(e.probs[:n] - e.probs[n:]).sum(1),
            "map_shift": map_shift(maps[:n], maps[n:]).numpy(),
        }
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="IG steps")
    ap.add_argument("--patch-steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mobilenet_v2")
    _, val_images, attacked = even_photo_validation(model, ("patch", "bim"), args.patch_steps)
    # the stop-8 photo configuration this probe examined: saliency or IG maps, no occlusion, the MNIST score
    saliency = replace(IMAGENET_CONFIG, method="saliency", occlusion=0.0, signals=LEGACY_SIGNALS)
    ig = replace(saliency, method="ig", explain=ExplainParams(steps=args.steps))
    configs = {"saliency": saliency, f"ig ({args.steps} steps)": ig}
    lines = ["# ImageNet validation probe (even-positioned photos only)", "",
             f"Command: `python scripts/probe_imagenet.py --steps {args.steps} --patch-steps {args.patch_steps}`. "
             "Patch trained on 125 even photos; 125 other even photos are the validation set. Two-sided ROC-AUC "
             "(max(AUC, 1 − AUC); the arrow says which way the attack moves the signal) of each signal, clean vs "
             "attacked validation photos. NLM h=10. The evaluation photos (odd positions) are not read.", "",
             ", ".join(f"{n}: {r.success_rate:.0%} success, {len(r.images)} adversarials" for n, r in attacked.items()),
             ""]
    for label, cfg in configs.items():
        det = Detector(model, cfg)
        t = time.perf_counter()
        clean = signals(det, val_images)
        ms = 1000 * (time.perf_counter() - t) / len(val_images)
        lines += [f"## {label} ({ms:.0f} ms per detection)", "", "| signal | " + " | ".join(attacked) + " |",
                  "|---|" + "---|" * len(attacked)]
        adv = {n: signals(det, r.images) for n, r in attacked.items()}
        for sig in clean:
            cells = []
            for n in attacked:
                auc = roc_auc(clean[sig], adv[n][sig])
                cells.append(f"{max(auc, 1 - auc):.3f} {'↑' if auc >= 0.5 else '↓'}")
            lines.append(f"| {sig} | " + " | ".join(cells) + " |")
        lines.append("")
        print(label, "done", flush=True)
    lines.append(f"Run time {(time.perf_counter() - start) / 60:.1f} min.")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
