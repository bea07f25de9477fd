"""Soak the embedded stack: real digits at a fixed share of its saturation rate for a long while, with a small
share of bad inputs mixed in; writes ``reports/soak/report.md`` and ``metrics.json``.

    python scripts/soak.py --minutes 60 --window-minutes 10   # an hour at 60% of saturation, 1% bad inputs
    python scripts/soak.py --minutes 5 --out /tmp/soak

The stack is ``explainer serve``'s (a local redis-server, Ray, the Serve app of deploy/serve.yaml). Saturation is
measured first by a burst. Per window (5 minutes by default): images sent, verdicts, bad inputs and how each was
answered (a dead letter or an error verdict), images lost, enqueue → verdict p50 / p99. The RSS of every process of
the stack at the start of the load and at its end, and its growth per million images.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation.proc_cpu import label  # noqa: E402
from pipeline import load_sample_digits  # noqa: E402
from worker import wire  # noqa: E402
from worker.collect import collect_verdicts, last_id  # noqa: E402
from worker.embedded import embedded_stack  # noqa: E402
from worker.feed import push_images  # noqa: E402
from worker.local_redis import free_port  # noqa: E402
from worker.streams import StreamNames, connect  # noqa: E402

BAD_KINDS = ("undecodable", "wrong_size", "unknown_model", "truncated_png")


def bad_entry(kind: str, rid: str, digit: np.ndarray) -> bytes:
    """One bad request of ``kind``: a dead letter (undecodable, unknown_model, truncated_png) or an error verdict
    (wrong_size)."""
    if kind == "undecodable":
        return msgpack.packb({"v": 1, "id": rid, "image": "not bytes"})
    if kind == "wrong_size":
        return wire.encode_request(rid, np.zeros((28, 29), np.uint8), meta={"enqueued_at": time.time()})
    if kind == "unknown_model":
        return wire.encode_request(rid, digit, model="no-such-model")
    png = wire.encode_request(rid, digit, encoding="png")
    req = msgpack.unpackb(png, raw=False)
    req["image"] = req["image"][: len(req["image"]) // 2]
    return msgpack.packb(req, use_bin_type=True)


def rss_by_process() -> dict[str, float]:
    """MiB of resident memory of each process of the stack (and this one), by label and pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = next(int(line.split()[1]) for line in (entry / "status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        name = label(cmd, "soak driver (producer + collector)", int(entry.name))
        if name not in ("other",):
            out[f"{name} [{entry.name}]"] = rss / 1024
    return out


class Collector:
    """Reads the verdict and dead-letter streams as they grow: per image index, whether it was answered, and the
    latencies by window."""

    def __init__(self, client, names: StreamNames, n_max: int, window_of) -> None:
        self.client, self.names, self.window_of = client, names, window_of
        self.answered = np.zeros(n_max, np.uint8)  # how many outcomes each image got
        self.latency: dict[int, list[float]] = defaultdict(list)
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cursors = {self.names.verdicts: last_id(self.client, self.names.verdicts),
                   self.names.dead: last_id(self.client, self.names.dead)}
        while not self.stop.is_set():
            reply = self.client.xread(cursors, count=2000, block=200)
            for stream, entries in reply or []:
                stream = stream.decode()
                for sid, fields in entries:
                    cursors[stream] = sid.decode()
                    if stream == self.names.verdicts:
                        v = wire.decode_verdict(fields[b"data"])
                        rid = v["id"]
                        self.errors += bool(v.get("error"))
                    else:
                        d = wire.decode_dead_letter(fields[b"data"])
                        rid = _id_of(d)
                    if rid is None or not rid.startswith("s-"):
                        continue
                    k = int(rid.split("-")[1])
                    self.answered[k] += 1
                    if stream == self.names.verdicts and not v.get("error"):
                        self.latency[self.window_of(k)].append(v["latency_ms"])


def _id_of(dead: dict) -> str | None:
    try:
        return msgpack.unpackb(dead["payload"], raw=False).get("id")
    except Exception:  # noqa: BLE001 - a dead letter's payload is what could not be read
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fraction", type=float, default=0.6, help="share of the measured saturation rate")
    ap.add_argument("--bad", type=float, default=0.01, help="share of bad inputs")
    ap.add_argument("--window-minutes", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "soak")
    args = ap.parse_args()
    digits = load_sample_digits().images
    names = StreamNames()
    with embedded_stack(data_dir=Path("/tmp") / f"soak-{int(time.time())}", http_port=free_port()) as st:
        client = connect(st.redis_url)
        burst = np.concatenate([digits] * 3)
        ids = [f"burst-{i}" for i in range(len(burst))]
        after = last_id(client, names.verdicts)
        t = time.perf_counter()
        push_images(client, names, burst, ids=ids)
        got = collect_verdicts(client, names, ids, after, timeout_s=600)
        saturation = len(got) / (time.perf_counter() - t)
        rate = args.fraction * saturation
        seconds = 60 * args.minutes
        window_s = 60 * args.window_minutes
        n_max = int(rate * seconds * 1.05) + 1000
        sent_at = np.zeros(n_max)
        print(f"saturation {saturation:.0f}/s; soaking at {rate:.0f}/s for {args.minutes:g} min", flush=True)
        start = time.time()
        collector = Collector(client, names, n_max, lambda k: int((sent_at[k] - start) // window_s))
        collector.thread.start()
        rss_start = rss_by_process()
        rss_at, sent_by_window = {0: rss_start}, {0: 0}  # each window's start: RSS, and images sent before it
        rng = np.random.default_rng(0)
        chunk = max(1, int(rate * 0.05))
        sent, bad_sent = 0, defaultdict(lambda: defaultdict(int))
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds and sent + chunk < n_max:
            time.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
            window = int(elapsed // window_s)
            if window not in rss_at:
                rss_at[window], sent_by_window[window] = rss_by_process(), sent
            good, bad = [], []
            for k in range(sent, sent + chunk):
                sent_at[k] = time.time()
                if rng.random() < args.bad:
                    kind = BAD_KINDS[k % len(BAD_KINDS)]
                    bad.append(bad_entry(kind, f"s-{k}", digits[k % len(digits)]))
                    bad_sent[window][kind] += 1
                else:
                    good.append(k)
            if good:
                push_images(client, names, digits[np.array(good) % len(digits)], ids=[f"s-{k}" for k in good])
            with client.pipeline(transaction=False) as p:
                for data in bad:
                    p.xadd(names.images, {"data": data})
                p.execute()
            sent += chunk
        deadline = time.time() + 300
        while time.time() < deadline and int((collector.answered[:sent] > 0).sum()) < sent:
            time.sleep(1)
        time.sleep(2)
        collector.stop.set()
        collector.thread.join(10)
        rss_end = rss_by_process()
        pending = int(client.xpending(names.images, names.group)["pending"])
    windows = []
    for w in range(int(np.ceil(seconds / window_s))):
        idx = np.flatnonzero((sent_at[:sent] >= start + w * window_s) & (sent_at[:sent] < start + (w + 1) * window_s))
        lat = collector.latency.get(w, [])
        windows.append({
            "window": w, "sent": int(len(idx)), "bad_sent": int(sum(bad_sent[w].values())),
            "answered": int((collector.answered[idx] > 0).sum()), "lost": int((collector.answered[idx] == 0).sum()),
            "answered_twice": int((collector.answered[idx] > 1).sum()),
            "p50_ms": float(np.percentile(lat, 50)) if lat else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat else None,
        })
    # after warm-up: from the start of the second window (the first one's end) to the end
    warm = rss_at.get(1, rss_start)
    warm_sent = sent_by_window.get(1, 0)
    both = sorted(set(rss_start) & set(rss_end) & set(warm))
    rss = {k: {"start_mib": rss_start[k], "warm_mib": warm[k], "end_mib": rss_end[k],
               "growth_mib_per_million": (rss_end[k] - rss_start[k]) / max(sent, 1) * 1e6,
               "growth_after_warm_up_mib_per_million": (rss_end[k] - warm[k]) / max(sent - warm_sent, 1) * 1e6}
           for k in both}
    result = {"saturation_per_s": saturation, "rate_per_s": rate, "minutes": args.minutes, "bad_share": args.bad,
              "sent": sent, "error_verdicts": collector.errors, "pending_after": pending, "windows": windows,
              "rss": rss, "rss_by_window": {str(w): v for w, v in rss_at.items()},
              "window_minutes": args.window_minutes, "processes_gone": sorted(set(rss_start) - set(rss_end)),
              "processes_new": sorted(set(rss_end) - set(rss_start))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "report.md").write_text(render(result, args))
    print(f"wrote {args.out}/report.md", flush=True)


def render(r: dict, args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# Soak: the embedded stack under steady load", "",
        f"Produced by `python scripts/soak.py --minutes {args.minutes:g} --fraction {args.fraction:g} --bad "
        f"{args.bad:g} --window-minutes {args.window_minutes:g}` (commit {commit}, {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, 2 CPU cores; the "
        "driver, Redis, Ray and the four Serve stages share them). Raw figures: `metrics.json`.", "",
        f"Saturation (a burst of {3 * 2000} digits): {r['saturation_per_s']:.0f} images/s; the soak offered "
        f"{r['rate_per_s']:.0f}/s ({args.fraction:.0%}) for {r['minutes']:g} min: {r['sent']} images, "
        f"{args.bad:.0%} of them bad (undecodable, wrong size, unknown model, truncated PNG, in turn). "
        f"Error verdicts (the wrong-size images): {r['error_verdicts']}; entries pending at the end: "
        f"{r['pending_after']}.", "",
        "| window | images sent | of them bad | answered (verdict or dead letter) | lost | answered twice | p50 ms | "
        "p99 ms |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in r["windows"]:
        p50 = f"{w['p50_ms']:.0f}" if w["p50_ms"] is not None else "-"
        p99 = f"{w['p99_ms']:.0f}" if w["p99_ms"] is not None else "-"
        lines.append(f"| {w['window'] * args.window_minutes:g}–{(w['window'] + 1) * args.window_minutes:g} min | "
                     f"{w['sent']} | {w['bad_sent']} | {w['answered']} | **{w['lost']}** | {w['answered_twice']} | "
                     f"{p50} | {p99} |")
    timed = [w for w in r["windows"] if w["p99_ms"] is not None]
    ratio = timed[-1]["p99_ms"] / timed[0]["p99_ms"] if len(timed) > 1 else float("nan")
    lines += ["", "Latency: enqueue → verdict of the valid images (`latency_ms`), by the window they were sent in. "
              f"The last window's p99 is **{ratio:.2f}×** the first's (goal ≤ 1.5×). Lost: "
              f"**{sum(w['lost'] for w in r['windows'])}**; answered twice: "
              f"**{sum(w['answered_twice'] for w in r['windows'])}**.",
              "", "## Memory", "", "RSS at the start of the load, after the first window (warm-up) and at the end; "
              "growth per million images over the whole soak and after warm-up.", "",
              "| process | RSS at start, MiB | after warm-up | at end | growth per million images, MiB "
              "| after warm-up |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in sorted(r["rss"].items(), key=lambda kv: -kv[1]["end_mib"]):
        lines.append(f"| {name} | {m['start_mib']:.0f} | {m['warm_mib']:.0f} | {m['end_mib']:.0f} | "
                     f"{m['growth_mib_per_million']:+.1f} | {m['growth_after_warm_up_mib_per_million']:+.1f} |")
    if r["processes_gone"] or r["processes_new"]:
        lines += ["", f"Processes that ended during the soak: {r['processes_gone'] or 'none'}; that started: "
                  f"{r['processes_new'] or 'none'} (a replaced replica shows as both)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
