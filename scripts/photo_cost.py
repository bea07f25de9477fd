"""What the photo signals cost: seconds per photo of the shipped photo configuration beside the previous one (the
max of occlusion_shift, prediction_shift, activation_norm and transplant_gain) and beside the explanation's floor
(the forward and backward passes of the photo and its denoised copy, plain torch), for MobileNetV2 (shared
weights) and ResNet-18 (random weights: timing only), timed in interleaved rounds in one run so that the host's
drift cancels in the ratios. Writes reports/bench/photo_cost.md and photo_cost.json.
Usage: ``python scripts/photo_cost.py [--n 32 --batch 16 --rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.datasets import load_imagenet_sample  # noqa: E402
from evaluation.throughput import floor_throughput  # noqa: E402
from pipeline import Detector, DetectorConfig, load_model, preset, read_image_file  # noqa: E402
from pipeline.runtime import keep_allocations_mapped  # noqa: E402

PREVIOUS = {"occlusion_shift": {"fraction": 0.05}, "prediction_shift": {}, "activation_norm": {},
            "transplant_gain": {"fraction": 0.15, "hosts": 8}}


def seconds_per_photo(det: Detector, photos: list, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(photos), batch):
        det.detect(photos[i : i + batch], rule="sign")
    return (time.perf_counter() - start) / len(photos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    args = ap.parse_args()
    keep_allocations_mapped()
    rows = load_imagenet_sample()
    photos = [read_image_file(p) for p, _ in rows[1 : 2 * args.n : 2]]
    hosts = [read_image_file(p) for p, _ in rows[0:16:2]]
    shipped = preset("photos")
    previous = DetectorConfig(method=shipped.method, explain=shipped.explain, entropy=shipped.entropy,
                              nlm=shipped.nlm, signals=PREVIOUS)
    results = {}
    for name, random_init in (("mobilenet_v2", False), ("resnet18", True)):
        model = load_model(name, random_init=random_init)
        dets = {"shipped": Detector(model, shipped), "previous": Detector(model, previous)}
        for det in dets.values():
            det.use_hosts(hosts)
            seconds_per_photo(det, photos[: args.batch], args.batch)  # warm-up
        rounds = []
        for _ in range(args.rounds):
            floor = 1 / floor_throughput(dets["shipped"], batch=args.batch, repeat=1)["images_per_s"]
            rounds.append({"floor": floor, **{k: seconds_per_photo(d, photos, args.batch) for k, d in dets.items()}})
        med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
        results[name] = {
            "weights": "random (timing only)" if random_init else "shared", "rounds": rounds, "median": med,
            "shipped_over_previous": float(np.median([r["shipped"] / r["previous"] for r in rounds])),
            "shipped_over_floor": float(np.median([r["shipped"] / r["floor"] for r in rounds])),
            "previous_over_floor": float(np.median([r["previous"] / r["floor"] for r in rounds])),
        }
        print(name, json.dumps(results[name]["median"]), flush=True)
    out = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, "photos": args.n, "batch": args.batch,
           "shipped_signals": list(shipped.signals), "previous_signals": list(PREVIOUS), "models": results}
    (args.out / "photo_cost.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# What the photo signals cost", "",
             f"`python scripts/photo_cost.py --n {args.n} --batch {args.batch} --rounds {args.rounds}` "
             f"({platform.platform()}, {torch.get_num_threads()} torch threads, CPU). {args.n} ImageNet sample "
             f"photos in calls of {args.batch}, every signal measured (the sign rule decides: same work). The "
             f"shipped photo configuration ({', '.join(shipped.signals)}) beside the previous one "
             f"({', '.join(PREVIOUS)}) and the explanation's floor (plain torch: the forward and backward passes "
             "of the photo and its denoised copy); medians of per-round values and ratios over "
             f"{args.rounds} interleaved rounds.", "",
             "| model | floor s/photo | previous s/photo | shipped s/photo | shipped / previous | shipped / floor |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["median"]
        lines.append(f"| {name} ({r['weights']}) | {m['floor']:.3f} | {m['previous']:.3f} | {m['shipped']:.3f} | "
                     f"**{r['shipped_over_previous']:.2f}×** | {r['shipped_over_floor']:.2f}× |")
    lines += ["", "The shipped configuration's extra cost is its noisy copies (4 forward passes per photo); "
              "feature_distance and chroma_residual read what the prediction pass and the pixels already hold, "
              "and the previous configuration's inpainted copy is gone.", ""]
    (args.out / "photo_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
