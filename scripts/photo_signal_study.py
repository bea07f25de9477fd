"""Validation study: which signals, and which combination of them, detect photo attacks at 1% and 0.1% FPR?

Validation photos only, never the evaluation ones (odd ImageNet-sample photos; the last quarter of nips17 and of
Imagenette's ImageNet-validation photos):

- clean: Imagenette's ImageNet-*training* photos (``--clean`` of them, spread over the file) and the ImageNet
  sample photos at even positions;
- attacked: ``--attacked`` other Imagenette training photos and the even ImageNet sample photos, with PGD at 8/255
  and 2/255, BIM stopped at its first success, CW-L2 (on ``--cw`` of them) and the universal patch (trained on
  the even ImageNet sample photos at even positions of that list, attacking the others).

Every candidate signal is measured on every photo once and cached (``--cache``): the registered ones (the photo
preset's, the entropies, ``noise_shift``, ``denoise_residual``) and candidates computed here from the model
itself: the softmax confidence, the logit margin, the energy (logsumexp of the logits), the first-order L∞
distance to the decision boundary (margin over the gradient's L1 norm), the shift after one signed gradient step
towards the runner-up class, and the pooled Grad-CAM-layer features (for a Mahalanobis distance fitted on clean
photos). ``scripts/photo_signal_choice.py`` reads the cache and makes the choice. Usage:
``python scripts/photo_signal_study.py [--clean 600 --attacked 200 --cw 100]``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.attacks import AdversarialPatch  # noqa: E402
from evaluation.datasets import SHARED_DATA, load_imagenet_sample  # noqa: E402
from evaluation.imagenet import IMAGENET_ATTACKS, load_photos, spread  # noqa: E402
from evaluation.metrics import run_attack, to_tensor  # noqa: E402
from pipeline import Detector, DetectorConfig  # noqa: E402
from pipeline.presets import preset  # noqa: E402
from pipeline.signals import first_output  # noqa: E402

STEPS = (0.5 / 255, 1 / 255, 2 / 255)


def imagenette_rows(source: str) -> list[tuple[Path, int]]:
    folder = SHARED_DATA / "imagenette"
    with open(folder / "labels.csv", newline="") as fh:
        return [(folder / "images" / r["filename"], int(r["class_index"])) for r in csv.DictReader(fh)
                if r["source"] == source]


def study_config() -> DetectorConfig:
    """The photo preset with every registered candidate beside its own signals."""
    base = preset("photos")
    return DetectorConfig(method=base.method, explain=base.explain, entropy=base.entropy, nlm=base.nlm,
                          signals={**base.signals, "noise_shift": {"sigma": 0.04, "copies": 4},
                                   "denoise_residual": {}})


def model_features(det: Detector, images: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """The candidates computed here from the model: confidence, margin, energy, first-order boundary distance,
    the shift after one signed gradient step towards the runner-up at each of ``STEPS``, pooled features."""
    net, out = det.model.net, {}
    parts: dict[str, list] = {}
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with first_output(det.model.gradcam_layer) as seen, torch.enable_grad():
            logits = net(x).float()
            top2 = logits.topk(2, dim=1)
            gap = top2.values[:, 0] - top2.values[:, 1]
            (grad,) = torch.autograd.grad(gap.sum(), [x])
        probs = torch.softmax(logits.detach(), 1)
        rows = torch.arange(len(x))
        cls = top2.indices[:, 0]
        feats = seen[0].float().mean(dim=(2, 3))
        parts.setdefault("confidence", []).append(1 - probs.max(1).values)
        parts.setdefault("margin", []).append(-gap.detach())
        parts.setdefault("energy", []).append(torch.logsumexp(logits.detach(), 1))
        parts.setdefault("boundary_distance", []).append(
            -(gap.detach() / grad.abs().flatten(1).sum(1).clamp_min(1e-12)))
        parts.setdefault("features", []).append(feats)
        with torch.inference_mode():
            for eps in STEPS:
                stepped = (x.detach() - eps * grad.sign()).clamp(0, 1)
                p2 = torch.softmax(net(stepped).float(), 1)
                parts.setdefault(f"step_shift_{eps * 255:g}", []).append((probs - p2).abs().sum(1))
                parts.setdefault(f"step_drop_{eps * 255:g}", []).append(probs[rows, cls] - p2[rows, cls])
    for k, v in parts.items():
        out[k] = torch.cat(v).cpu().numpy().astype(np.float64 if k != "features" else np.float32)
    return out


def measure(det: Detector, images: np.ndarray) -> dict[str, np.ndarray]:
    registered = det.analyse_many(images, batch_size=16)
    return {**{k: v for k, v in registered.items() if k not in ("predicted_class",)}, **model_features(det, images)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean", type=int, default=600)
    ap.add_argument("--attacked", type=int, default=200)
    ap.add_argument("--cw", type=int, default=100)
    ap.add_argument("--patch-steps", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/photo_signal_study"))
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    args.cache.mkdir(parents=True, exist_ok=True)
    shipped = Detector.from_pretrained("mobilenet_v2",
                                       weights=SHARED_DATA.parent / "models" / "mobilenet_v2_imagenet.pth")
    model = shipped.model
    det = Detector(model, study_config())
    det.use_hosts(shipped.hosts)  # the shipped transplant hosts (even ImageNet sample photos)

    train = imagenette_rows("imagenet-train")
    clean_rows = spread(train[0::2], args.clean)
    attack_rows = spread(train[1::2], args.attacked)
    even = load_imagenet_sample()[0::2]
    t0 = time.perf_counter()
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, rows in (("clean_train", clean_rows), ("clean_sample", even), ("attack_train", attack_rows)):
        sets[name] = load_photos(model, rows)
    print(f"loaded photos in {time.perf_counter() - t0:.0f}s", flush=True)

    def cached(name: str, make) -> None:
        path = args.cache / f"{name}.npz"
        if path.exists():
            return
        t = time.perf_counter()
        images, source = make()
        values = measure(det, images) if len(images) else {}
        np.savez_compressed(path, images=images, source=source, **values)
        print(f"{name}: {len(images)} photos in {time.perf_counter() - t:.0f}s", flush=True)

    cached("clean", lambda: (np.concatenate([sets["clean_train"][0], sets["clean_sample"][0]]),
                             np.array(["train"] * len(sets["clean_train"][0]) + ["sample"] * len(even))))
    attack_images = np.concatenate([sets["attack_train"][0], sets["clean_sample"][0]])
    attack_labels = np.concatenate([sets["attack_train"][1], sets["clean_sample"][1]])
    attack_source = np.array(["train"] * len(sets["attack_train"][0]) + ["sample"] * len(even))
    for name in ("pgd", "pgd-2", "bim-early", "cw-l2", "patch"):
        def make(name=name):
            images, labels, source = attack_images, attack_labels, attack_source
            if name == "cw-l2":
                attack = IMAGENET_ATTACKS["cw-l2"]()
                keep = np.linspace(0, len(images) - 1, args.cw).round().astype(int)
                images, labels, source = images[keep], labels[keep], source[keep]
            elif name == "patch":
                attack = AdversarialPatch(**{**IMAGENET_ATTACKS["patch"].keywords, "steps": args.patch_steps})
                patch_train = sets["clean_sample"][0][0::2]
                attack.fit(model.net, to_tensor(patch_train).to(model.device))
                images, labels = sets["clean_sample"][0][1::2], sets["clean_sample"][1][1::2]
                source = np.array(["sample"] * len(images))
            else:
                attack = IMAGENET_ATTACKS[name]()
            run = run_attack(model, name, attack, images, labels, batch=16)
            print(f"  {name}: success {run.success_rate:.1%} of {run.attempted} in {run.seconds:.0f}s", flush=True)
            return run.images, source[run.source]
        cached(name, make)
    print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
