"""Where the streaming path spends its CPU: per-process CPU time per image, and py-spy samples of each replica.

Starts the embedded stack as ``explainer bench`` does (deploy/serve.yaml, local redis-server, local Ray), warms
it, then pushes a burst of MNIST digits and, while it drains, (1) reads every process's CPU time from
/proc/<pid>/stat before and after, and (2) samples the Ingress, Denoiser, Explainer and Scorer replicas with
py-spy (Python stacks, idle frames left out). Writes a Markdown report: CPU ms per image by process, the
share of a core each used, and each replica's hottest functions (self and inclusive, as shares of wall time).

Run: python scripts/profile_streaming.py [--burst 4000] [--out reports/streaming_profile.md]
       [--override key=value ...]   (application args of deploy/serve.yaml, e.g. torch_threads=2)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from worker.bench import mnist_images
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack
from worker.feed import push_images
from worker.local_redis import free_port
from worker.proc_cpu import REPLICAS, cpu_by_label, cpu_seconds, label
from worker.streams import StreamNames, connect

RATE = 200  # py-spy samples per second


def machine_ticks() -> dict[str, int]:
    """The machine-wide CPU tick counters of /proc/stat (user, system, idle, iowait, steal, ...)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    return dict(zip(names, map(int, values), strict=True))


def hottest(raw: Path, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Samples, and the top functions by self samples and by inclusive samples, from py-spy's raw format."""
    own, incl, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                  for f in stack.split(";")[1:]]  # first frame is the thread
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own.most_common(top), incl.most_common(top)


def stage_stats() -> dict[str, dict]:
    """Each stage's own counters (worker.serve_app.StageStats; one replica per stage assumed)."""
    from ray import serve

    return {name: serve.get_deployment_handle(name, app_name="explainer").stats.remote().result()
            for name in REPLICAS[1:]}


def machine_shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    delta = {k: after[k] - before[k] for k in before}
    total = max(sum(delta.values()), 1)
    return {k: v / total for k, v in delta.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burst", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("reports/streaming_profile.md"))
    ap.add_argument("--override", action="append", default=[], help="serve.yaml app arg, key=value")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--no-py-spy", action="store_true", help="CPU accounting only (py-spy costs most of a core)")
    ap.add_argument("--sample", default=",".join(REPLICAS), help="the replicas py-spy samples, comma-separated")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.override)}
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    images = mnist_images(1000)
    burst = images[np.arange(args.burst) % len(images)]
    work = Path(".explainer") / "profile"
    with embedded_stack(data_dir=work, http_port=free_port(), overrides=overrides) as st:
        client, names = connect(st.redis_url), StreamNames()
        after = last_id(client, names.verdicts)
        push_images(client, names, images[:256], ids=[f"warm{i}" for i in range(256)])
        collect_verdicts(client, names, [f"warm{i}" for i in range(256)], after, timeout_s=120)
        procs = cpu_seconds()
        pids = {label(cmd): pid for pid, (cmd, _) in procs.items() if label(cmd) in REPLICAS}
        after = last_id(client, names.verdicts)
        ids = [f"p{i}" for i in range(len(burst))]
        samplers = {  # recording until SIGINT, sent when the burst has drained
            name: subprocess.Popen([pyspy, "record", "-p", str(pid), "-r", str(RATE),
                                    "-f", "raw", "-o", str(work / f"{name}.raw"), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items() if not args.no_py_spy and name in args.sample.split(",")
        }
        time.sleep(1.0)  # py-spy attaches
        stats_before = stage_stats()
        before, ticks_before = cpu_seconds(), machine_ticks()
        t = time.perf_counter()
        push_images(client, names, burst, ids=ids)
        got = collect_verdicts(client, names, ids, after, timeout_s=600)
        wall = time.perf_counter() - t
        after_cpu, ticks_after = cpu_seconds(), machine_ticks()
        stats_after = stage_stats()
        for p in samplers.values():
            p.send_signal(signal.SIGINT)
        for p in samplers.values():
            p.wait(timeout=120)
    by_label = cpu_by_label(before, after_cpu, own="this script (producer + collector)")
    n = len(got)
    total_cpu = sum(v for k, v in by_label.items() if k != "py-spy")
    lines = ["# Streaming profile", "", __doc__.split("\n\n")[1], "",
             f"Command: `python scripts/profile_streaming.py --burst {len(burst)}"
             + "".join(f" --override {o}" for o in args.override) + (" --no-py-spy" if args.no_py_spy else "")
             + f"`; {os.cpu_count()} CPUs.", "",
             f"Burst of {len(burst)} digits: {n} verdicts in {wall:.2f} s = **{n / wall:.0f} images/s**. CPU used by "
             f"every process but py-spy: {total_cpu:.2f} s of {os.cpu_count() * wall:.2f} core-seconds "
             f"({total_cpu / (os.cpu_count() * wall):.0%}); {1000 * total_cpu / n:.3f} ms of CPU per image.", "",
             "Machine-wide (/proc/stat, all CPUs): " + ", ".join(
                 f"{k} {v:.0%}" for k, v in machine_shares(ticks_before, ticks_after).items() if v >= 0.005) + ".",
             "", "| process | CPU ms per image | share of one core |", "|---|---|---|"]
    for name, secs in by_label.items():
        if secs > 0:
            lines.append(f"| {name} | {1000 * secs / n:.3f} | {secs / wall:.0%} |")
    lines += ["", "Inside each stage's own call (worker.serve_app.StageStats): the share of the burst's wall time the "
              "replica spent in it, and its wall and thread-CPU ms per image there (the calling thread only: "
              "torch's and OpenCV's worker threads are in the per-process table above).", "",
              "| stage | calls | images per call | busy | wall ms per image | CPU ms per image |",
              "|---|---|---|---|---|---|"]
    for name in REPLICAS[1:]:
        d = {k: stats_after[name][k] - stats_before[name][k] for k in ("calls", "images", "busy_s", "cpu_s")}
        if d["images"]:
            lines.append(f"| {name} | {d['calls']} | {d['images'] / max(d['calls'], 1):.0f} | "
                         f"{d['busy_s'] / wall:.0%} | {1000 * d['busy_s'] / d['images']:.3f} | "
                         f"{1000 * d['cpu_s'] / d['images']:.3f} |")
    for name in REPLICAS:
        raw = work / f"{name}.raw"
        if name not in samplers:
            continue
        if not raw.exists():
            lines += ["", f"## {name}: no py-spy samples"]
            continue
        total, own, incl = hottest(raw, args.top)
        seconds = wall + 1.0  # the recording starts 1 s before the burst
        lines += ["", f"## {name}: {total} samples ({total / RATE:.1f} thread-seconds in {seconds:.1f} s)", "",
                  "Share of the recording's wall time each function was on a sampled stack (threads add up; "
                  "py-spy counts a thread blocked in native code as active, so Ray's own loops show too).", "",
                  "| self | function | | inclusive | function |", "|---|---|---|---|---|"]
        for (f1, c1), (f2, c2) in zip(own, incl, strict=False):
            lines.append(f"| {c1 / RATE / seconds:.0%} | `{f1}` | | {c2 / RATE / seconds:.0%} | `{f2}` |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
