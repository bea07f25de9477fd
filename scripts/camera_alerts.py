"""False alerts per camera-hour and time to alert, per alert policy, on simulated camera streams of real photos.

A camera is one NIPS 2017 web photo (never in ImageNet, so never trained on), filmed at 10 fps: every frame is
the photo shifted by up to 4 pixels, with sensor noise (Gaussian, σ 2 levels) and re-encoded as JPEG (quality
80–95), as the shipped MobileNetV2 detector sees it. The detector's flags on those frames at its 5% and 1%
points give each camera's flag rate; frames of one camera differ only by the independent noise, so an hour of
that camera is simulated as 36,000 frames flagged independently at that rate, and each policy counts its
episodes (the window policy's semantics of worker.streams: open at k flagged of the last n, close at none).
Attacks: a universal adversarial patch (64², trained on the even ImageNet sample photos) that stays in view
from a moment on, and one injected PGD photo (8/255, 10 steps). Writes reports/alerts/report.md and
metrics.json. Usage: ``python scripts/camera_alerts.py [--cameras 24] [--frames 40]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.cameras import FPS, camera_frames  # noqa: E402
from evaluation.datasets import load_imagenet_sample  # noqa: E402
from evaluation.imagenet import IMAGENET_ATTACKS, load_photos  # noqa: E402
from evaluation.metrics import to_tensor  # noqa: E402
from pipeline import Detector, read_image_file  # noqa: E402

HOUR = 3600 * FPS
POLICIES = ((1, 1), (2, 5), (3, 10), (5, 20))  # (k, n): k flagged of the last n; (1, 1) is an alert per image
NIPS17 = ROOT.parent / "shared" / "data" / "nips17"


def episodes(flags: np.ndarray, k: int, n: int) -> list[int]:
    """Frame indices at which the policy alerts: every flagged frame for the per-image policy (k = n = 1), else
    where the window policy opens an episode (as worker.streams' script does)."""
    if (k, n) == (1, 1):
        return list(np.flatnonzero(flags))
    opened, window, is_open = [], [], False
    for i, f in enumerate(flags):
        window.insert(0, bool(f))
        del window[n:]
        hits = sum(window)
        if hits >= k and not is_open:
            opened.append(i)
            is_open = True
        elif hits == 0 and is_open:
            is_open = False
    return opened


def simulated(rate: float, k: int, n: int, frames_: int, rng: np.random.Generator) -> list[int]:
    return episodes(rng.random(frames_) < rate, k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", type=int, default=24)
    ap.add_argument("--frames", type=int, default=40, help="real frames per camera, clean and with the patch")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "alerts")
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    rng = np.random.default_rng(0)
    det = Detector.from_pretrained("mobilenet_v2")
    points = {p.target_fpr: p.threshold for p in det.calibration.points}
    with open(NIPS17 / "labels.csv") as fh:
        rows = [(NIPS17 / "images" / r["filename"], int(r["class_index"])) for r in csv.DictReader(fh)]
    rows = rows[: args.cameras]
    photos = np.concatenate([det.model.prepare(read_image_file(p)[None]) for p, _ in rows])
    labels = np.array([c for _, c in rows])

    def scores(images: np.ndarray) -> np.ndarray:
        return np.concatenate([det.detect(images[i : i + 16]).score for i in range(0, len(images), 16)])

    clean = np.stack([scores(camera_frames(p, args.frames, rng)) for p in photos])  # (cameras, frames)
    print(f"clean frames scored: {clean.size} in {time.time() - started:.0f}s", flush=True)

    sample = load_imagenet_sample()
    train, _ = load_photos(det.model, sample[0::2][:96])
    patch = IMAGENET_ATTACKS["patch"](steps=100)
    patch.fit(det.model.net, to_tensor(train))
    patched_photos = (patch(det.model.net, to_tensor(photos), torch.from_numpy(labels)) * 255).round().byte()
    patched_photos = patched_photos.permute(0, 2, 3, 1).numpy()
    patched = np.stack([scores(camera_frames(p, args.frames, rng)) for p in patched_photos])
    pgd = IMAGENET_ATTACKS["pgd"]()
    x_adv = pgd(det.model.net, to_tensor(photos), torch.from_numpy(labels))
    single = scores((x_adv * 255).round().byte().permute(0, 2, 3, 1).numpy())
    print(f"attacks scored in {time.time() - started:.0f}s", flush=True)

    metrics: dict = {"cameras": len(photos), "frames_per_camera": args.frames, "fps": FPS, "points": {}}
    for fpr, threshold in sorted(points.items(), reverse=True):
        rates = (clean > threshold).mean(1)
        patch_rates = (patched > threshold).mean(1)
        row = {"frame_fpr": float((clean > threshold).mean()), "cameras_ever_flagged": int((rates > 0).sum()),
               "patch_frame_detection": float((patched > threshold).mean()),
               "single_pgd_detection": float((single > threshold).mean()), "policies": {}}
        for k, n in POLICIES:
            per_hour = [len(simulated(r, k, n, HOUR, rng)) for r in rates]
            observed = sum(len(episodes(c > threshold, k, n)) for c in clean)
            to_alert = []
            for r in patch_rates:
                opened = simulated(r, k, n, 600 * FPS, rng)
                to_alert.append(opened[0] / FPS if opened else float("inf"))
            row["policies"][f"{k}/{n}"] = {
                "false_alerts_per_camera_hour_mean": float(np.mean(per_hour)),
                "false_alerts_per_camera_hour_max": int(np.max(per_hour)),
                "cameras_with_false_alerts": int(sum(h > 0 for h in per_hour)),
                "observed_episodes_in_real_frames": int(observed),
                "patch_seconds_to_alert_median": float(np.median(to_alert)),
                "patch_cameras_never_alerted_in_10_min": int(sum(t == float("inf") for t in to_alert)),
                "single_photo_alert_rate": float((single > threshold).mean()) if k == 1 else 0.0,
            }
        metrics["points"][f"{fpr:g}"] = row
    metrics["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    lines = ["# Alert policies on simulated cameras", "",
             f"`python scripts/camera_alerts.py --cameras {args.cameras} --frames {args.frames}` "
             f"({metrics['seconds'] / 60:.1f} min on 2 CPU cores). {len(photos)} cameras, each one NIPS 2017 web "
             f"photo (never trained on) filmed at {FPS} fps: shifts of up to 4 px, sensor noise σ 2, JPEG 80–95; "
             f"{args.frames} real frames per camera scored by the shipped MobileNetV2 detector, then an hour per "
             "camera simulated at each camera's measured flag rate (frames differ only by independent noise). "
             "Patch: a universal 64² patch (100 steps, trained on even ImageNet sample photos) in view from t=0. "
             "Single: one PGD 8/255 photo injected into the stream.", ""]
    for point, row in metrics["points"].items():
        lines += [f"## {float(point):.0%} point: frame FPR {row['frame_fpr']:.1%} "
                  f"({row['cameras_ever_flagged']} of {len(photos)} cameras ever flagged); patch frames flagged "
                  f"{row['patch_frame_detection']:.1%}; one PGD photo flagged {row['single_pgd_detection']:.1%}", "",
                  "| policy | false alerts per camera-hour (mean / worst camera) | cameras with any | episodes in the "
                  "real frames | patch: median s to alert | patch: cameras not alerted in 10 min | single PGD "
                  "photo alerted |", "|---|---|---|---|---|---|---|"]
        for name, p in row["policies"].items():
            label = "per image" if name == "1/1" else f"{name.split('/')[0]} of last {name.split('/')[1]}"
            lines.append(f"| {label} | {p['false_alerts_per_camera_hour_mean']:.1f} / "
                         f"{p['false_alerts_per_camera_hour_max']} | {p['cameras_with_false_alerts']} | "
                         f"{p['observed_episodes_in_real_frames']} | {p['patch_seconds_to_alert_median']:.1f} | "
                         f"{p['patch_cameras_never_alerted_in_10_min']} | {p['single_photo_alert_rate']:.1%} |")
        lines.append("")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
