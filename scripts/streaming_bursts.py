"""Bursts through the embedded stack, each beside an in-process run: the A/B harness of a streaming lever.

Starts the stack as ``explainer bench`` does (deploy/serve.yaml, local redis-server, local Ray, one replica of the
CPU stages), warms it with 2,000 digits, then for each round times the in-process detector on the burst's digits
and pushes the burst through the stream. Prints, per burst: images/s, the ratio to the in-process runs just before
and after it (their mean, as the bench takes it; the run after one burst is the run before the next), the CPU
each process used per image (from /proc, worker.proc_cpu) and each replica's minor page faults; then the median ratio
and CPU over the bursts. Run it alternating A and B (a lever on, off) to compare, since this machine's speed drifts
by tens of percent within minutes.

Run: python scripts/streaming_bursts.py [--burst 16000] [--rounds 5] [--override key=value ...]
       [--deployment '{"Explainer": {...}}']   (application args and deployment options of deploy/serve.yaml)
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from pipeline import Detector, keep_allocations_mapped
from pipeline.bench import detector_throughput
from worker.bench import mnist_images
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack
from worker.feed import push_images
from worker.local_redis import free_port
from worker.proc_cpu import REPLICAS, cpu_by_label, cpu_seconds, label
from worker.streams import StreamNames, connect


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burst", type=int, default=16000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--override", action="append", default=[], help="serve.yaml app arg, key=value")
    ap.add_argument("--deployment", default="{}", help="deployment options as JSON, by deployment name")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.override)}
    one = {"num_replicas": 1, "autoscaling_config": None}
    deployments = {"Denoiser": one, "Scorer": one, **json.loads(args.deployment)}
    keep_allocations_mapped()
    det = Detector.from_pretrained("mnist")
    images = mnist_images(1000)
    burst = images[np.arange(args.burst) % len(images)]
    ratios, totals = [], []
    with embedded_stack(data_dir=Path(".explainer") / "bursts", http_port=free_port(), overrides=overrides,
                        deployment_overrides=deployments) as st:
        client, names = connect(st.redis_url), StreamNames()
        warm = [f"warm{i}" for i in range(2000)]
        after = last_id(client, names.verdicts)
        push_images(client, names, images[np.arange(2000) % len(images)], ids=warm)
        collect_verdicts(client, names, warm, after, timeout_s=180)
        local_after = detector_throughput(det, burst, 256, repeat=1)
        for r in range(args.rounds):
            local_before = local_after
            after = last_id(client, names.verdicts)
            ids = [f"b{r}-{i}" for i in range(len(burst))]
            before = cpu_seconds()
            replicas = {p: label(cmd) for p, (cmd, _) in before.items() if label(cmd) in REPLICAS}
            faults = {p: minor_faults(p) for p in replicas}
            t = time.perf_counter()
            push_images(client, names, burst, ids=ids)
            got = collect_verdicts(client, names, ids, after, timeout_s=600)
            rate = len(got) / (time.perf_counter() - t)
            used = {k: 1000 * v / len(got) for k, v in cpu_by_label(before, cpu_seconds(), own="this script").items()}
            faulted = Counter()
            for p, name in replicas.items():
                faulted[name] += minor_faults(p) - faults[p]
            total = sum(v for k, v in used.items() if k != "other")
            # the in-process run after this burst is the one before the next: each burst is read against the
            # mean of the two around it, as the bench does, since the machine's speed drifts
            local_after = detector_throughput(det, burst, 256, repeat=1)
            local = (local_before + local_after) / 2
            ratios.append(rate / local)
            totals.append(total)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in used.items() if v >= 0.002)
            print(f"burst {r}: {rate:.0f} images/s, in-process {local_before:.0f}/s before and {local_after:.0f}/s "
                  f"after, ratio {rate / local:.0%}; CPU "
                  f"{total:.3f} ms per image ({parts}); page faults "
                  + ", ".join(f"{k} {v}" for k, v in sorted(faulted.items())), flush=True)
    print(f"median over {len(ratios)} bursts: ratio {np.median(ratios):.1%} (range {min(ratios):.0%}-"
          f"{max(ratios):.0%}), CPU {np.median(totals):.3f} ms per image")


if __name__ == "__main__":
    main()
