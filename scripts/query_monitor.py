"""The query monitor against query attacks on the service, on camera streams, and attacked itself.

Run: python scripts/query_monitor.py [--square 100] [--hsj 100] [--service-runs 20] [--blind 20] [--cameras 24]
[--frames 1000]   (writes reports/query_monitor/report.md and metrics.json).

- Attacks: Square (score-based, L∞ 0.3, 1,000 queries) and HopSkipJump (decision-based, L2, 5,000 queries) on
  the shipped digits detector through the service (evaluation.query_attacks): a success is a wrong answer the
  detector does not flag at its 1% point (HopSkipJump: also within L2 ``HSJ_BUDGET`` of the original). One source
  per attacked digit (odd test digits the service answers right). For each run: the query at which the monitor
  alerts (the stream's default policy, replayed), the query that first succeeded, and so whether the alert came
  first.
- Cameras: NIPS 2017 photos filmed as evaluation.cameras does (shifts, sensor noise, JPEG), at σ 2, 1 and 0.5
  grey levels: how many frames probe, and so the false alerts per camera-day.
- The monitor attacked: blinding noise on every query (and what it costs the attack), benign images spaced
  between queries, queries spread over several sources.
- Memory per source, measured in a real redis-server after a run of digits and one of photos, and the replay
  checked against the stream worker's own script on the same queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from math import comb
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.cameras import CAMERA_DAY, camera_frames  # noqa: E402
from evaluation.datasets import SHARED_DATA, load_test_digits  # noqa: E402
from evaluation.metrics import machine_description, rate_ci95  # noqa: E402
from evaluation.query_attacks import (  # noqa: E402
    MonitorPolicy,
    ServiceHopSkipJump,
    ServiceOracle,
    ServiceSquare,
    replay_monitor,
)
from pipeline import Detector, Fingerprint, read_image_file  # noqa: E402
from pipeline.queries import compare  # noqa: E402
from worker import wire  # noqa: E402
from worker.local_redis import LocalRedis  # noqa: E402
from worker.streams import StreamConsumer, StreamNames, StreamSettings, connect, iter_stream  # noqa: E402

HSJ_BUDGET = 3.0  # L2 in [0, 1] pixels (the pgd-l2 attack's radius is 2.0: HopSkipJump rarely gets there in 5,000)
FPR = 0.01
# whom the attacker must fool: the service (the model, and the detector at its 1% point), or the model alone (the
# detector ignored: the monitor is then the only defence)
TARGETS = {"service": FPR, "model alone": None}
SPACINGS = (1, 4, 16, 40)
SPACED_RUNS = 20  # runs replayed with spacing (each m + 1 times longer)
SPACED_QUERIES = 1000  # and of each, the queries up to its success, at most these
SOURCES = (4, 16, 64)
NOISE = (2.0, 1.0, 0.5)


def policy() -> MonitorPolicy:
    st = StreamSettings()
    return MonitorPolicy(st.probe_k, st.probe_n, st.probe_history)


def runs_table(oracle: ServiceOracle, pol: MonitorPolicy) -> list[dict]:
    """Per attacked image: queries sent, the first success (None: never), the monitor's alert (None: never)."""
    rows = []
    for i, sent in oracle.sent.items():
        success = oracle.succeeded[i]
        first = next((q for q, s in enumerate(success) if s), None)
        alert, probes = replay_monitor(sent, pol)
        rows.append({"image": i, "queries": len(sent), "success_at": first, "alert_at": alert,
                     "probes": int(sum(probes))})
    return rows


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    before = [r["alert_at"] is not None and (r["success_at"] is None or r["alert_at"] < r["success_at"])
              for r in rows]
    alerts = [r["alert_at"] + 1 for r in rows if r["alert_at"] is not None]
    successes = [r["success_at"] + 1 for r in rows if r["success_at"] is not None]
    return {
        "runs": n, "flagged_before_success": sum(before), "flagged_before_success_rate": sum(before) / n,
        "flagged_before_success_ci95": rate_ci95(sum(before), n),
        "flagged_at_all": len(alerts), "median_queries_to_flag": float(np.median(alerts)) if alerts else None,
        "max_queries_to_flag": int(max(alerts)) if alerts else None,
        "succeeded": len(successes), "median_queries_to_success": float(np.median(successes)) if successes else None,
        "median_queries_sent": float(np.median([r["queries"] for r in rows])),
    }


def spaced(sent: list[np.ndarray], fillers: np.ndarray, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The attacker's queries with ``m`` benign images (other digits) sent between each two."""
    out = []
    for q in sent:
        out.append(q)
        out.extend(fillers[rng.integers(0, len(fillers), m)])
    return out


def first_alert_over_sources(sent: list[np.ndarray], s: int, pol: MonitorPolicy) -> int | None:
    """Queries sent in all (round robin over ``s`` sources) when the first source alerts (None: none does)."""
    firsts = []
    for j in range(s):
        alert, _ = replay_monitor(sent[j::s], pol)
        if alert is not None:
            firsts.append(alert * s + j + 1)
    return min(firsts) if firsts else None


def monitor_attacked(rows: list[dict], sent: list[list[np.ndarray]], fillers: np.ndarray, pol: MonitorPolicy,
                     log) -> dict:
    """The same runs replayed with benign images spaced between queries, and dealt over several sources."""
    out: dict = {"spaced": {}, "sources": {}}
    for m in SPACINGS:
        rows_m = []
        for r, s in list(zip(rows, sent, strict=True))[:SPACED_RUNS]:
            # up to the success (what matters is whether the alert comes first), at most SPACED_QUERIES
            s = s[: SPACED_QUERIES if r["success_at"] is None else min(r["success_at"] + 1, SPACED_QUERIES)]
            alert, _ = replay_monitor(spaced(s, fillers, m, np.random.default_rng(r["image"])), pol)
            # the attack's own queries sent when the alert came, and whether before its success
            rows_m.append({"image": r["image"], "queries": len(s), "success_at": r["success_at"],
                           "alert_at": None if alert is None else alert // (m + 1), "probes": 0})
        out["spaced"][str(m)] = summarise(rows_m)
        log(f"  spaced by {m}: flagged before success {out['spaced'][str(m)]['flagged_before_success_rate']:.0%}")
    for s_count in SOURCES:
        firsts = [first_alert_over_sources(s, s_count, pol) for s in sent]
        before = [f is not None and (r["success_at"] is None or f <= r["success_at"])
                  for f, r in zip(firsts, rows, strict=True)]
        got = [f for f in firsts if f is not None]
        out["sources"][str(s_count)] = {"flagged_before_success_rate": float(np.mean(before)),
                                        "median_queries_to_first_alert": float(np.median(got)) if got else None}
        log(f"  over {s_count} sources: flagged before success {np.mean(before):.0%}")
    return out


def camera_study(cameras: int, frames: int, pol: MonitorPolicy, log) -> dict:
    photos = sorted((SHARED_DATA / "nips17" / "images").iterdir())[:cameras]
    out = {}
    for noise in NOISE:
        rng = np.random.default_rng(0)
        probes = alerts = total = 0
        rms, unchanged = [], []
        for path in photos:
            scene = read_image_file(path)[:224, :224]
            stream = camera_frames(scene, frames if noise == NOISE[0] else frames // 5, rng, noise=noise)
            alert, p = replay_monitor(stream, pol)
            probes += sum(p)
            alerts += alert is not None
            total += len(stream)
            prev = Fingerprint.of(stream[0])
            for f in stream[1:40]:  # how far consecutive frames sit from the monitor's thresholds
                cur = Fingerprint.of(f)
                c = compare(cur, prev)
                rms.append(c.rms)
                unchanged.append(c.unchanged)
                prev = cur
        # an alert needs k probes among n frames; with probes independent at a rate r per frame, about
        # C(n, k) r^k alerts per frame (an upper bound with r at its 95% bound)
        bound = rate_ci95(probes, total)[1]
        per_day = comb(pol.n, pol.k) * bound**pol.k * CAMERA_DAY
        out[f"{noise:g}"] = {"noise": noise, "cameras": len(photos), "frames": total, "probes": probes,
                             "alerts_in_frames": alerts, "probe_rate_95_upper": bound,
                             "false_alerts_per_camera_day_bound": per_day,
                             "consecutive_rms_min": float(np.min(rms)), "consecutive_rms_median": float(np.median(rms)),
                             "consecutive_unchanged_max": float(np.nanmax(unchanged))}
        log(f"cameras σ {noise:g}: {probes} probes in {total} frames, {alerts} alerts; consecutive frames RMS "
            f"min {np.min(rms):.2f}, unchanged max {np.nanmax(unchanged):.2f}")
    return out


def delivered(cons: StreamConsumer, n: int) -> list[str]:
    """``n`` new image entries read into the consumer's group (verdicts are written for pending entries only)."""
    for _ in range(n):
        cons.client.xadd(cons.names.images, {"data": b"x"})
    sids = [sid for sid, _ in cons.read(block_ms=0)]
    assert len(sids) == n, f"read {len(sids)} of {n} entries"
    return sids


def redis_check(sent_runs: list[list[np.ndarray]], pol: MonitorPolicy, photos: list[np.ndarray]) -> dict:
    """The replay against the stream worker's script, and memory per source, in a real redis-server."""
    out: dict = {"agree": [], "memory_bytes": {}}
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(Path(tmp)) as server:
        client = connect(server.url)
        names = StreamNames.with_prefix(f"qm-{uuid.uuid4().hex[:6]}")
        cons = StreamConsumer(client, names, consumer="w")
        cons.ensure_group()
        for r, sent in enumerate(sent_runs):
            source = f"attacker-{r}"
            for start in range(0, len(sent), 64):
                chunk = sent[start : start + 64]
                sids = delivered(cons, len(chunk))
                results = [(sid, {"v": 1, "id": f"q{start + i}", "model": "mnist", "is_adversarial": False,
                                  "source": source}) for i, sid in enumerate(sids)]
                cons.publish(results, {sid: Fingerprint.of(img) for sid, img in zip(sids, chunk, strict=True)})
            alerts = [wire.decode_alert(d) for _, d in iter_stream(client, names.episodes)]
            mine = [a for a in alerts if a["source"] == source and a["kind"] == "probing"]
            served = int(mine[0]["entries"][0]["id"][1:]) if mine else None
            replayed, _ = replay_monitor(sent, pol)
            out["agree"].append({"stream": served, "replay": replayed})
        out["memory_bytes"]["digits"] = int(client.memory_usage(f"{names.probe_prefix}attacker-0"))
        sids = delivered(cons, len(photos))
        cons.publish([(sid, {"v": 1, "id": f"p{i}", "model": "m", "is_adversarial": False, "source": "camera"})
                      for i, sid in enumerate(sids)],
                     {sid: Fingerprint.of(img) for sid, img in zip(sids, photos, strict=True)})
        out["memory_bytes"]["photos"] = int(client.memory_usage(f"{names.probe_prefix}camera"))
        client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--square", type=int, default=100, help="Square runs (one digit each)")
    ap.add_argument("--hsj", type=int, default=100, help="HopSkipJump runs")
    ap.add_argument("--service-runs", type=int, default=20, help="runs of each attack on the whole service (slower)")
    ap.add_argument("--blind", type=int, default=30, help="runs of each attack with blinding noise")
    ap.add_argument("--cameras", type=int, default=24)
    ap.add_argument("--frames", type=int, default=1000, help="frames per camera at σ 2 (a fifth at the others)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "query_monitor")
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    log = print
    pol = policy()
    det = Detector.from_pretrained("mnist")
    threshold = det.calibration.point(FPR).threshold
    odd = load_test_digits().parity("odd")
    res = det.detect(odd.images)
    usable = np.flatnonzero((res.predicted_class == odd.labels) & (res.score <= threshold))
    rng = np.random.default_rng(0)
    picked = rng.choice(usable, size=max(args.square, args.hsj), replace=False)
    x_all = torch.from_numpy(odd.images[picked]).float().div(255).unsqueeze(1)
    y_all = torch.from_numpy(odd.labels[picked]).long()
    metrics: dict = {"policy": {"k": pol.k, "n": pol.n, "history": pol.history, **vars(pol.params)},
                     "fpr": FPR, "threshold": threshold, "attacks": {}}

    def square(n: int, blind: float, fpr: float | None) -> tuple[list[dict], ServiceOracle]:
        oracle = ServiceOracle(det, fpr, blind=blind)
        attack = ServiceSquare(eps=0.3, n_queries=1000, p_init=0.8, oracle=oracle)
        attack(det.model.net, x_all[:n], y_all[:n])
        return runs_table(oracle, pol), oracle

    def hsj(n: int, blind: float, fpr: float | None) -> tuple[list[dict], ServiceOracle]:
        oracle = ServiceOracle(det, fpr, blind=blind)
        attack = ServiceHopSkipJump(max_queries=5000, oracle=oracle)
        # the start: a digit of another class the service answers wrongly and leaves unflagged
        starts = []
        for y in y_all[:n].tolist():
            other = usable[odd.labels[usable] != y]
            starts.append(odd.images[rng.choice(other)])
        starts_t = torch.from_numpy(np.stack(starts)).float().div(255).unsqueeze(1)
        attack.run(det.model.net, x_all[:n], y_all[:n], starts_t)
        # a success needs the budget too: the first answer that succeeded within L2 HSJ_BUDGET of the original
        for i, sent in oracle.sent.items():
            x0 = odd.images[picked[i]].astype(np.float64) / 255
            within = [np.linalg.norm(s.astype(np.float64) / 255 - x0) <= HSJ_BUDGET for s in sent]
            oracle.succeeded[i] = [a and b for a, b in zip(oracle.succeeded[i], within, strict=True)]
        return runs_table(oracle, pol), oracle

    sent_for_checks: list[list[np.ndarray]] = []
    for target, fpr in TARGETS.items():
        for name, fn, n in (("square", square, args.square), ("hop_skip_jump", hsj, args.hsj)):
            n = n if fpr is None else min(n, args.service_runs)
            began = time.time()
            rows, oracle = fn(n, 0.0, fpr)
            entry = {"plain": summarise(rows), "seconds": time.time() - began}
            log(f"{name} on the {target}: {json.dumps(entry['plain'])}")
            sent = [oracle.sent[i] for i in sorted(oracle.sent)]
            sent_for_checks.append(sent[0])
            entry.update(monitor_attacked(rows, sent, odd.images[usable], pol, log))
            if args.blind:
                began = time.time()
                rows_b, _ = fn(min(args.blind, n), 2.0, fpr)
                entry["blinded_sigma_2"] = {**summarise(rows_b), "seconds": time.time() - began}
                entry["unblinded_same_runs"] = summarise(rows[: min(args.blind, n)])
                log(f"  blinded σ 2: {json.dumps(entry['blinded_sigma_2'])}")
            metrics["attacks"][f"{name} ({target})"] = entry

    metrics["cameras"] = camera_study(args.cameras, args.frames, pol, log)
    photos = [read_image_file(p)[:224, :224] for p in sorted((SHARED_DATA / "nips17" / "images").iterdir())[:40]]
    metrics["redis"] = redis_check(sent_for_checks, pol, photos)
    metrics["seconds"] = time.time() - started
    metrics["machine"] = machine_description()
    metrics["command"] = "python scripts/query_monitor.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_report(args.out, metrics)


def write_report(out: Path, m: dict) -> None:
    p = m["policy"]
    lines = ["# The query monitor", "",
             f"`{m['command']}` ({m['seconds'] / 60:.1f} min on {m['machine']}).", "",
             f"Policy (the stream's defaults): a probing alert when {p['k']} of a source's last {p['n']} images are "
             f"small edits of one of its last {p['history']} (pipeline.queries: ≥ {p['sparse']:.0%} of the non-flat "
             f"{p['block']}×{p['block']} blocks unchanged but not all, or an RMS difference above 0 and under "
             f"{p['noise_floor']:g} grey level). Attacks on the shipped digits detector's model, one source per "
             "attacked digit (odd test digits the service answers right and leaves unflagged). On the **service** "
             f"a success is a wrong answer the detector leaves unflagged at its {m['fpr']:.0%} point; on the **model "
             "alone** a wrong answer, whatever the detector says: where the detector does not stop an attack, the "
             f"monitor is the only defence (HopSkipJump: within L2 {HSJ_BUDGET:g} of the original too). Square: L∞ "
             "0.3, 1,000 queries, reading logits and the detector's score; HopSkipJump: 5,000 queries, reading only "
             "success.",
             "",
             "## Attack runs", "",
             "| attack | runs | flagged before success | median queries to flag (max) | succeeded without the monitor "
             "| median queries to success | median queries sent |", "|---|---|---|---|---|---|---|"]
    for name, e in m["attacks"].items():
        s = e["plain"]
        lo, hi = s["flagged_before_success_ci95"]
        rate = 100 * s["flagged_before_success_rate"]
        lines.append(f"| {name} | {s['runs']} | {s['flagged_before_success']} ({rate:.1f}%, "
                     f"{100 * lo:.1f}–{100 * hi:.1f}) | {s['median_queries_to_flag']} ({s['max_queries_to_flag']}) | "
                     f"{s['succeeded']} | {s['median_queries_to_success']} | {s['median_queries_sent']} |")
    lines += ["", "## Cameras (false alerts)", "",
              "Each camera: one NIPS 2017 photo (224×224) filmed as evaluation.cameras does: shifts of up to 4 px, "
              "Gaussian sensor noise of σ grey levels, JPEG 80–95. A false alert needs "
              f"{p['k']} probing frames among {p['n']}; the bound per camera-day (10 fps) takes the probe rate at its "
              "95% upper bound and frames probing independently.", "",
              "| σ | cameras | frames | probing frames | alerts | false alerts per camera-day (95% bound) | "
              "consecutive frames: RMS min / median | unchanged blocks max |", "|---|---|---|---|---|---|---|---|"]
    for c in m["cameras"].values():
        lines.append(f"| {c['noise']:g} | {c['cameras']} | {c['frames']} | {c['probes']} | {c['alerts_in_frames']} | "
                     f"{c['false_alerts_per_camera_day_bound']:.2g} | {c['consecutive_rms_min']:.2f} / "
                     f"{c['consecutive_rms_median']:.2f} | {c['consecutive_unchanged_max']:.2f} |")
    lines += ["", "## The monitor attacked", "",
              f"**Spacing** (the first {SPACED_RUNS} runs, up to their success or {SPACED_QUERIES} queries): m "
              "benign digits sent between each two queries from the same source (the attack costs m + 1 times its "
              "queries). **Several sources**: queries dealt round "
              "robin over S sources; the count is of all queries sent when the first source alerts. **Blinding**: "
              "fresh Gaussian noise (σ 2 grey levels) on every query, beside the same runs without it.", "",
              "| attack | evasion | flagged before success | median queries to flag | succeeded | median queries "
              "to success |", "|---|---|---|---|---|---|"]
    for name, e in m["attacks"].items():
        for k, s in e["spaced"].items():
            lines.append(f"| {name} | spaced by {k} | {100 * s['flagged_before_success_rate']:.1f}% | "
                         f"{s['median_queries_to_flag']} | {s['succeeded']} | {s['median_queries_to_success']} |")
        for k, s in e["sources"].items():
            lines.append(f"| {name} | over {k} sources | {100 * s['flagged_before_success_rate']:.1f}% | "
                         f"{s['median_queries_to_first_alert']} (all sources) | – | – |")
        if "blinded_sigma_2" in e:
            for label, s in (("none (same runs)", e["unblinded_same_runs"]), ("blinded σ 2", e["blinded_sigma_2"])):
                lines.append(f"| {name} | {label} | {100 * s['flagged_before_success_rate']:.1f}% | "
                             f"{s['median_queries_to_flag']} | {s['succeeded']} of {s['runs']} | "
                             f"{s['median_queries_to_success']} |")
    r = m["redis"]
    lines += ["", "## Memory and the stream's own script", "",
              f"A source's state in redis-server (MEMORY USAGE of its hash, {p['history']} fingerprints and a window "
              f"of {p['n']}): **{r['memory_bytes']['digits'] / 1024:.1f} KiB** for digits, "
              f"**{r['memory_bytes']['photos'] / 1024:.1f} KiB** for 224×224 photos, whatever the stream's length. "
              "The replay above against the worker's Lua script on the same queries (the image at which each "
              "alerts): " + ", ".join(f"stream {a['stream']} / replay {a['replay']}" for a in r["agree"]) + ".", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
