"""Validation probe for a patch signal on ImageNet, on the even-positioned photos only (never the evaluation ones).

Why: saliency and IG maps do not separate patched photos, and NLM cannot remove a patch, so the paper's "denoise
and explain again" has nothing to compare. A patch is local, so this asks whether the explanation can find it and
whether removing what it points at changes the answer (the idea of SentiNet, Chou et al. 2020): Grad-CAM of the
predicted class at the last convolutional block, the spatial entropy of that map (a patch concentrates it), then
the top-q fraction of the upsampled map inpainted with OpenCV (Telea) and the photo classified again (prediction
shift: L1 distance between the two softmax vectors).

Split (evaluation.imagenet.even_photo_validation): of the even-positioned photos, those at even positions of that
list (125) train the patch; the other 125 are the validation photos, clean and attacked (patch, BIM). Writes
reports/validation/imagenet_patch_probe.md.

Run: python scripts/probe_imagenet_patch.py [--patch-steps 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam

from evaluation.imagenet import even_photo_validation
from evaluation.metrics import roc_auc, to_tensor
from pipeline.models import load_model

OUT = Path(__file__).resolve().parents[1] / "reports" / "validation" / "imagenet_patch_probe.md"
FRACTIONS = (0.05, 0.10, 0.15)


def cam_signals(model, images: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    net, gradcam = model.net, LayerGradCam(model.net, model.gradcam_layer)
    out: dict[str, list] = {}
    for i in range(0, len(images), batch):
        u8 = images[i : i + batch]
        x = to_tensor(u8)
        with torch.inference_mode():
            probs = torch.softmax(net(x), 1)
        pred = probs.argmax(1)
        cam = gradcam.attribute(x, target=pred).detach().clamp_min(0)  # (n, 1, 7, 7)
        p = cam.flatten(1) / cam.flatten(1).sum(1, keepdim=True).clamp_min(1e-12)
        row = {"cam_entropy": -(p * torch.log2(p.clamp_min(1e-12))).sum(1).numpy(),
               "cam_peak": p.max(1).values.numpy()}
        up = F.interpolate(cam, size=u8.shape[1:3], mode="bilinear", align_corners=False)[:, 0].numpy()
        for q in FRACTIONS:
            occluded = np.empty_like(u8)
            for j, (img, m) in enumerate(zip(u8, up, strict=True)):
                mask = (m >= np.quantile(m, 1 - q)).astype(np.uint8)
                occluded[j] = cv2.inpaint(img, mask, 5, cv2.INPAINT_TELEA)
            with torch.inference_mode():
                po = torch.softmax(net(to_tensor(occluded)), 1)
            row[f"occlusion_shift_{q:.2f}"] = (probs - po).abs().sum(1).numpy()
            drop = probs.gather(1, pred[:, None]) - po.gather(1, pred[:, None])
            row[f"occlusion_drop_{q:.2f}"] = drop[:, 0].numpy()
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch-steps", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mobilenet_v2")
    _, val_images, attacked = even_photo_validation(model, ("patch", "bim"), args.patch_steps)
    t = time.perf_counter()
    clean = cam_signals(model, val_images)
    ms = 1000 * (time.perf_counter() - t) / len(val_images)
    adv = {n: cam_signals(model, r.images) for n, r in attacked.items()}
    lines = ["# ImageNet patch probe: Grad-CAM entropy and explanation-guided occlusion (even photos only)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Command: `python scripts/probe_imagenet_patch.py --patch-steps {args.patch_steps}`; "
             f"{ms:.0f} ms per photo for all signals. "
             + ", ".join(f"{n}: {r.success_rate:.0%} success, {len(r.images)} adversarials"
                         for n, r in attacked.items()),
             "", "Two-sided ROC-AUC (max(AUC, 1 − AUC); the arrow says which way the attack moves the signal), and "
             "the detection rate at the validation clean photos' own 95th percentile (in-sample, so optimistic; "
             "a probe, not an evaluation).", "",
             "| signal | " + " | ".join(f"{n} AUC | {n} DR@5%" for n in attacked) + " |",
             "|---|" + "---|---|" * len(attacked)]
    for sig in clean:
        cells = []
        for n in attacked:
            auc = roc_auc(clean[sig], adv[n][sig])
            up = auc >= 0.5
            thr = np.quantile(clean[sig], 0.95 if up else 0.05)
            dr = np.mean(adv[n][sig] > thr) if up else np.mean(adv[n][sig] < thr)
            cells += [f"{max(auc, 1 - auc):.3f} {'↑' if up else '↓'}", f"{dr:.0%}"]
        lines.append(f"| {sig} | " + " | ".join(cells) + " |")
    lines += ["", f"Run time {(time.perf_counter() - start) / 60:.1f} min."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
