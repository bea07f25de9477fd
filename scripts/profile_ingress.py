"""The Ingress's own per-image CPU outside Ray: read (XREADGROUP), decode, check, stack, verdict dicts and the
publish script, on a real local redis-server, with the stage calls replaced by one DetectionResult computed
beforehand. The stack's Ingress replica spends its CPU on this plus Ray Serve's handle calls; this script
measures the first part alone, so the second is the difference (docs/method.md, "Stop 19").

    python scripts/profile_ingress.py [--n 16384] [--batch 256] [--rounds 3] [--prof]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from pipeline import Detector
from worker import wire
from worker.bench import mnist_images
from worker.detect import detect_requests
from worker.local_redis import LocalRedis
from worker.streams import StreamConsumer, StreamNames, StreamWorker, connect


class PrecomputedDetector:
    """What ``detect_requests`` needs of a detector: the real checks and preparation (as the Ingress's
    ``RemoteDetector`` runs them), and one precomputed result in place of the stage calls."""

    def __init__(self, local: Detector, batch: int) -> None:
        self.local = local
        self.result = local.detect(mnist_images(batch))

    @property
    def config(self):
        return self.local.config

    @property
    def model(self):
        return self.local.model

    def check(self, image) -> None:
        self.local.check(image)

    def detect(self, images, rule=None, return_maps=False):
        self.local.prepare(images, as_pixels=True)
        if len(images) != len(self.result.score):
            raise ValueError(f"a read of {len(images)} images; the precomputed result has {len(self.result.score)}")
        return self.result


def one_round(redis: LocalRedis, det: PrecomputedDetector, n: int, batch: int, prof: cProfile.Profile | None):
    names = StreamNames()
    client = redis.client()
    client.delete(names.images)
    consumer = StreamConsumer(connect(redis.url), names, consumer="c0", count=batch, block_ms=200)
    consumer.ensure_group()
    worker = StreamWorker(consumer, lambda reqs: detect_requests(det, reqs))
    digits = mnist_images(batch)
    with client.pipeline(transaction=False) as p:
        for i in range(n):
            data = wire.encode_request(f"i{i}", digits[i % batch], meta={"enqueued_at": time.time()})
            p.xadd(names.images, {"data": data})
        p.execute()
    wall, cpu = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    done = 0
    while done < n:
        done += worker.run_once(block_ms=10)
    if prof:
        prof.disable()
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="images per round (a multiple of --batch)")
    ap.add_argument("--batch", type=int, default=256, help="XREADGROUP COUNT, as serve.yaml's batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prof", action="store_true", help="cProfile the last round (inflates its times)")
    a = ap.parse_args()
    det = PrecomputedDetector(Detector.from_pretrained("mnist"), a.batch)
    with LocalRedis(Path(tempfile.mkdtemp(prefix="profile-ingress-"))) as redis:
        for r in range(a.rounds):
            prof = cProfile.Profile() if a.prof and r == a.rounds - 1 else None
            wall_us, cpu_us = one_round(redis, det, a.n, a.batch, prof)
            print(f"round {r + 1}: {a.n} images in reads of {a.batch}: wall {wall_us:.1f} µs per image, "
                  f"this process's CPU {cpu_us:.1f} µs per image{' (profiled)' if prof else ''}")
        if a.prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
