"""``explainer demo``: the whole product on one machine, end to end, through Redis and Ray Serve.

Starts a local redis-server and Ray, deploys the Serve application, pushes N clean and N adversarial real
digits into the image stream, follows the verdict stream and the alert channel live, and prints what a user
would check: verdicts received, detection rate, false-positive rate, throughput, p50/p99 latency, pending left,
and the in-process ``Detector`` throughput on the same images in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import Detector, load_adversarial_digits, load_sample_digits
from worker.collect import VerdictReader, collect_verdicts
from worker.embedded import DEFAULT_CONFIG, embedded_stack
from worker.feed import push_images
from worker.streams import StreamNames, connect, is_cluster, served_shards


@dataclass
class DemoReport:
    sent: int
    received: int
    pending: int
    alerts: int
    detection_rate: float
    fpr: float
    stream_throughput: float
    inprocess_throughput: float
    p50_ms: float
    p99_ms: float

    @property
    def ratio(self) -> float:
        return self.stream_throughput / self.inprocess_throughput


def demo_images(n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """N held-out clean digits (odd test indices) and N adversarial digits shipped with the package."""
    clean = load_sample_digits().parity("odd").head(n)
    adv = load_adversarial_digits().head(n)
    images = np.concatenate([clean.images, adv.images])
    is_adv = np.r_[np.zeros(len(clean.images), bool), np.ones(len(adv.images), bool)]
    ids = [f"clean-{i}" for i in clean.indices] + [f"adv-{a}-{i}" for a, i in zip(adv.attacks, adv.indices,
                                                                                    strict=True)]
    return images, is_adv, ids


def run_demo(
    n: int = 200, redis_url: str | None = None, config: str | Path = DEFAULT_CONFIG, http_port: int = 8000,
    data_dir: str | Path = ".explainer", console: Console | None = None,
) -> DemoReport:
    console = console or Console()
    images, is_adv, ids = demo_images(n)
    console.print(f"[bold]explainer demo[/bold]: {int((~is_adv).sum())} clean + {int(is_adv.sum())} adversarial "
                  "real MNIST digits → Redis stream → Ray Serve (Denoiser → Explainer → Scorer) → verdicts")
    with console.status("starting redis-server, Ray and the Serve application…"):
        stack = embedded_stack(redis_url, config, data_dir, http_port)
        handle = stack.__enter__()
    try:
        client = connect(handle.redis_url)
        names = StreamNames()
        shards = served_shards(client, names)  # what the config serves, as the worker noted it
        alerts = _AlertCounter(client, names.alerts)
        after = VerdictReader(client, names, shards).positions()
        # warm-up: one message through every stage so start-up costs are not counted as throughput
        push_images(client, names, images[:1], ids=["warmup"], shards=shards)
        collect_verdicts(client, names, ["warmup"], after, timeout_s=120, shards=shards)
        after = VerdictReader(client, names, shards).positions()
        t0 = time.perf_counter()
        push_images(client, names, images, ids=ids, shards=shards)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("verdicts", total=len(ids))
            got = collect_verdicts(client, names, ids, after, timeout_s=600, shards=shards,
                                   progress=lambda k: bar.update(task, completed=k))
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        pending = sum(int(client.xpending(s.images, s.group)["pending"])
                      for s in names.shards(shards, is_cluster(client)))
        alerts.stop()
    finally:
        stack.__exit__(None, None, None)

    with console.status("in-process Detector on the same images…"):
        det = Detector.from_pretrained("mnist")
        det.detect(images[:64])
        t = time.perf_counter()
        for start in range(0, len(images), 64):
            det.detect(images[start : start + 64])
        inprocess = len(images) / (time.perf_counter() - t)

    flagged = np.array([bool(got[i]["is_adversarial"]) if i in got else False for i in ids])
    latencies = np.array([got[i]["latency_ms"] for i in ids if i in got])
    report = DemoReport(
        sent=len(ids), received=len(got), pending=pending, alerts=alerts.count,
        detection_rate=float(flagged[is_adv].mean()), fpr=float(flagged[~is_adv].mean()),
        stream_throughput=len(got) / elapsed, inprocess_throughput=inprocess,
        p50_ms=float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
    )
    _print(console, report, got, ids)
    return report


class _AlertCounter:
    """Counts adversarial alerts on the pub/sub channel, as an alerting system would receive them."""

    def __init__(self, client, channel: str) -> None:
        self.count = 0
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(**{channel: self._on_message})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_message(self, message) -> None:
        if message["data"] != b"warmup":
            self.count += 1

    def stop(self) -> None:
        time.sleep(0.3)
        self.thread.stop()
        self.thread.join(timeout=5)  # the reader thread must be gone before its connection closes
        self.pubsub.close()


def _print(console: Console, r: DemoReport, got: dict, ids: list[str]) -> None:
    sample = Table("id", "class", "score / threshold", "verdict", title="a few verdicts")
    for i in ids[:3] + ids[-3:]:
        v = got.get(i)
        if v:
            mark = "[red]ADVERSARIAL[/red]" if v["is_adversarial"] else "[green]clean[/green]"
            sample.add_row(i, str(v["predicted_class"]), f"{v['score']:.2f} / {v['threshold']:.2f}", mark)
    console.print(sample)
    t = Table("measure", "value", title="summary")
    t.add_row("verdicts received", f"{r.received} / {r.sent}")
    t.add_row("left pending in the consumer group", str(r.pending))
    t.add_row("alerts received on explainer:alerts", str(r.alerts))
    t.add_row("detection rate (adversarial flagged)", f"{r.detection_rate:.1%}")
    t.add_row("false-positive rate (clean flagged)", f"{r.fpr:.1%}")
    t.add_row("streaming throughput", f"{r.stream_throughput:.1f} images/s")
    t.add_row("in-process Detector throughput", f"{r.inprocess_throughput:.1f} images/s")
    t.add_row("streaming / in-process", f"{r.ratio:.0%} (of {r.sent} images, most of it the pipeline filling and "
              "draining: `explainer bench` times longer bursts)")
    t.add_row("latency p50 / p99 (enqueue → verdict, burst load)", f"{r.p50_ms:.0f} / {r.p99_ms:.0f} ms")
    console.print(t)
