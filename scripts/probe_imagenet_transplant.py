"""Validation probe: does the region a photo's Grad-CAM points at hijack *other* clean photos? Even photos only.

Why: the photo score without the transplant misses a few patched validation photos, most of them photos the
patch only disrupted (another class at low confidence), the others toasters. SentiNet (Chou et al., 2020) has two
halves. The shipped occlusion shift is the first (remove the salient region, classify again). The second is asked
here: paste the salient region onto clean host photos at the same place and see whether it takes them over. A
universal patch moves every host, whatever class it made the suspect photo look like; the salient region of a
clean photo (an object part) rarely moves a photo of something else.

Hosts: K clean calibration photos spread over the calibration list (the even photos at even positions, which
also train the patch); a calibration photo is never its own host (K+1 are drawn, itself dropped). For each
photo, the top ``q`` fraction of its Grad-CAM map (pipeline.occlude.top_relevance_masks) is copied onto each
host, and the hosts are classified again. Signals, each averaged over the hosts:
- transplant_shift: L1 distance between the host's softmax before and after (class-agnostic);
- transplant_flip: the fraction of hosts whose top-1 class changes;
- transplant_adopt: the host's probability of the suspect photo's predicted class after the paste.

Each signal alone: ROC-AUC and detection at the calibration photos' 95th percentile (with the validation clean
FPR at that cut). Combined, calibrated as the evaluation is (cross-fitted over 5 folds, 5% target) on the
calibration photos and scored on the validation photos: each added (upper tail) to the four signals of the
configuration without the transplant (entropy_original, occlusion_shift, prediction_shift, activation_norm), and
each in place of its Grad-CAM entropy, the level after the paste (adopt) beside the rise over the host's own
probability of that class (gain, shipped as transplant_gain). The patch here was trained on all 125 calibration
photos, hosts included; scripts/search_imagenet.py re-checks the shipped row with a patch that never saw the
hosts, as the evaluation trains it.

Run: python scripts/probe_imagenet_transplant.py   (writes reports/validation/imagenet_transplant_probe.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_imagenet import (  # noqa: E402
    CACHE,
    WITHOUT_TRANSPLANT,
    _cached,
    _photo_sets,
    calibrated_cells,
    config_signals,
    photo_calibration,
)

from evaluation.datasets import PROJECT_ROOT  # noqa: E402
from evaluation.metrics import roc_auc, to_tensor  # noqa: E402
from pipeline.detector import Detector  # noqa: E402
from pipeline.explain import explain  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.occlude import top_relevance_masks  # noqa: E402

PATCH_STEPS = 200
FRACTIONS = (0.05, 0.10, 0.15, 0.20)
N_HOSTS = (4, 8)
OUT = PROJECT_ROOT / "reports" / "validation" / "imagenet_transplant_probe.md"


def gradcam_maps(model, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Softmax (N, 1000) and upsampled Grad-CAM maps (N, 1, H, W) of the predicted class."""
    probs, maps = [], []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch])
        with torch.inference_mode():
            p = torch.softmax(model.net(x), 1)
        a = explain(model.net, x, p.argmax(1), "gradcam", WITHOUT_TRANSPLANT.explain, model.gradcam_layer)
        probs.append(p.numpy())
        maps.append(a.float().numpy())
    return np.concatenate(probs), np.concatenate(maps)


def softmax(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out.append(torch.softmax(model.net(to_tensor(images[i : i + batch])), 1).numpy())
    return np.concatenate(out)


def transplant_signals(model, images, probs, maps, hosts, host_probs, host_ids, self_ids=None):
    """{signal_q_k: (N,)} for every fraction and host count; ``self_ids[i]`` = the host index of photo i (or -1)."""
    out: dict[str, np.ndarray] = {}
    pred = probs.argmax(1)
    host_pred = host_probs.argmax(1)
    for q in FRACTIONS:
        masks = top_relevance_masks(maps, q).astype(bool)  # (N, H, W)
        shift = np.zeros((len(images), len(hosts)))
        flip = np.zeros_like(shift)
        adopt = np.zeros_like(shift)
        for j, host in enumerate(hosts):
            pasted = np.where(masks[..., None], images, host[None])
            pj = softmax(model, pasted)
            shift[:, j] = np.abs(pj - host_probs[j]).sum(1)
            flip[:, j] = pj.argmax(1) != host_pred[j]
            adopt[:, j] = pj[np.arange(len(images)), pred]
        out[f"raw_shift_q{q:.2f}"], out[f"raw_adopt_q{q:.2f}"] = shift, adopt  # per host, for other aggregates
        for k in N_HOSTS:
            use = np.zeros((len(images), len(hosts)), bool)
            for i in range(len(images)):
                cand = [j for j in range(len(hosts)) if self_ids is None or host_ids[j] != self_ids[i]]
                use[i, cand[:k]] = True
            for name, v in (("shift", shift), ("flip", flip), ("adopt", adopt)):
                out[f"transplant_{name}_q{q:.2f}_k{k}"] = (v * use).sum(1) / use.sum(1)
    return out


def gain_signals(model, photos, host_probs, host_ids, extra) -> dict[str, dict[str, np.ndarray]]:
    """{transplant_gain_q_k: {set: (N,)}}: the adopted probability less the host's own probability of that class,
    averaged over the same hosts as the adopt signals (a calibration photo never its own host)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, images in photos.items():
        pred = softmax(model, images).argmax(1)
        before = host_probs[:, pred].T  # (N, hosts)
        for q in FRACTIONS:
            rise = extra[name][f"raw_adopt_q{q:.2f}"] - before
            for k in N_HOSTS:
                use = np.zeros_like(rise, dtype=bool)
                for i in range(len(images)):
                    cand = [j for j in range(len(host_ids)) if name != "calibration" or host_ids[j] != i]
                    use[i, cand[:k]] = True
                out.setdefault(f"transplant_gain_q{q:.2f}_k{k}", {})[name] = (rise * use).sum(1) / use.sum(1)
    return out


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model("mobilenet_v2")
    photos = _photo_sets(model, PATCH_STEPS, True)
    measured = config_signals(Detector(model, WITHOUT_TRANSPLANT), photos, PATCH_STEPS, True)
    cal = photos["calibration"]
    host_ids = np.linspace(0, len(cal) - 1, max(N_HOSTS) + 1).round().astype(int)
    hosts = cal[host_ids]
    host_probs = softmax(model, hosts)
    t = time.perf_counter()

    def make() -> dict[str, np.ndarray]:
        flat = {}
        for name, images in photos.items():
            probs, maps = gradcam_maps(model, images)
            self_ids = np.arange(len(images)) if name == "calibration" else None
            flat |= {f"{name}/{k}": v for k, v in
                     transplant_signals(model, images, probs, maps, hosts, host_probs, host_ids, self_ids).items()}
            print(name, "done", f"{time.perf_counter() - t:.0f}s", flush=True)
        return flat

    flat = _cached(CACHE / f"imagenet_transplant_signals_{PATCH_STEPS}.npz", True, make)
    extra = {name: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(name + "/")} for name in photos}
    attacks = [k for k in photos if k not in ("calibration", "clean")]
    lines = ["# ImageNet transplant probe: SentiNet's second half (even photos only)", "",
             __doc__.split("\n\n", 1)[1].rsplit("\n\nRun:", 1)[0], "",
             "Command: `python scripts/probe_imagenet_transplant.py`. Validation: "
             f"{len(photos['clean'])} clean photos; " + ", ".join(f"{k} {len(photos[k])}" for k in attacks)
             + f". Hosts: calibration photos {host_ids.tolist()}.", "",
             "## Single signals", "",
             "| signal | validation FPR at the calibration 95th percentile | " + " | ".join(attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    singles = [s for s in extra["clean"] if not s.startswith("raw_")]
    for sig in singles:
        cut = np.quantile(extra["calibration"][sig], 0.95)
        cells = [f"{np.mean(extra[a][sig] > cut):.1%} / {roc_auc(extra['clean'][sig], extra[a][sig]):.3f}"
                 for a in attacks]
        lines.append(f"| {sig} | {np.mean(extra['clean'][sig] > cut):.1%} | " + " | ".join(cells) + " |")
    four = tuple(WITHOUT_TRANSPLANT.signals)  # entropy_original first: four[1:] drops it
    lines += ["", "## Added to the four signals without the transplant (upper tail), calibrated as the evaluation "
              "is", "",
              "| signals | validation FPR | " + " | ".join(attacks) + " |", "|---|---|" + "---|" * len(attacks)]
    merged = {k: {**measured[k], **extra[k]} for k in photos}
    c = photo_calibration(merged["calibration"], four)
    lines.append(f"| the four without the transplant | {calibrated_cells(c, merged, attacks)} |")
    for sig in singles:
        if "_flip_" in sig:
            continue  # a fraction of at most 8 hosts: too coarse for a quantile CDF
        c = photo_calibration(merged["calibration"], (*four, sig), {sig: "upper"})
        lines.append(f"| + {sig} | {calibrated_cells(c, merged, attacks)} |")
    lines += ["", "## In place of the Grad-CAM entropy: occlusion_shift, prediction_shift, activation_norm and one "
              "transplant signal", "", "| transplant signal | validation FPR | " + " | ".join(attacks) + " |",
              "|---|---|" + "---|" * len(attacks)]
    c = photo_calibration(merged["calibration"], four[1:])
    lines.append(f"| none | {calibrated_cells(c, merged, attacks)} |")
    for name, values in gain_signals(model, photos, host_probs, host_ids, extra).items():
        for k in photos:
            merged[k][name] = values[k]
    for q in FRACTIONS:
        for k in N_HOSTS:
            for sig in (f"transplant_adopt_q{q:.2f}_k{k}", f"transplant_gain_q{q:.2f}_k{k}"):
                c = photo_calibration(merged["calibration"], (*four[1:], sig), {sig: "upper"})
                lines.append(f"| {sig} | {calibrated_cells(c, merged, attacks)} |")
    lines += ["", f"Run time {(time.perf_counter() - start) / 60:.1f} min."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
