"""Delivery scenarios at full size, with real worker processes and a real redis-server: Redis at maxmemory,
the last second of the AOF lost (what a power cut does under ``appendfsync everysec``), messages that kill their
worker, and a verdict stream capped below what a reader left unread. ``scripts/reliability.py`` runs them; the
tests in ``tests/faults/test_delivery.py`` and ``test_backpressure.py`` are their small versions."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import faultkit as fk
import numpy as np
from reliability import Figures, Log, digits, environment, push, push_valid, settle, stop_all

from worker import wire

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def redis_oom(workdir: Path, n: int = 2000, full_s: float = 5.0, log: Log = print) -> Figures:
    """At a quarter of the verdicts Redis's maxmemory is set to half of what it holds (noeviction) for
    ``full_s`` seconds, then lifted. The worker must keep its computed verdicts, stop reading, and finish."""
    fig, t0 = Figures("Redis full (maxmemory, noeviction) for 5 s mid-stream"), time.monotonic()
    with environment(workdir) as env:
        env.worker("w0").wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "oom")
        fig.sent, want = n, set(ids)
        fk.wait_until(lambda: subs.count(want) >= n // 4, 300)
        # well under what it holds: trimming acked images alone cannot make room
        env.client.config_set("maxmemory", int(env.client.info("memory")["used_memory"]) // 2)
        at_full, most_pending, end = subs.count(want), 0, time.monotonic() + full_s
        while time.monotonic() < end:
            most_pending = max(most_pending, fk.pending(env.client, env.names))
            time.sleep(0.1)
        while_full = subs.count(want) - at_full
        env.client.config_set("maxmemory", 0)
        log(f"  full for {full_s:.0f} s at {at_full}/{n} verdicts: {while_full} verdicts landed meanwhile, at most "
            f"{most_pending} entries pending")
        settle(env, subs, ids, fig, timeout_s=600)
        stop_all(env, fig)
        fig.extra.update(verdicts_while_full=while_full, max_pending_while_full=most_pending, batch=64)
    fig.seconds = time.monotonic() - t0
    return fig


def aof_last_second(workdir: Path, n: int = 2000, log: Log = print) -> Figures:
    """At half the verdicts the AOF's length is noted, the stream runs on for one second, then redis-server is
    SIGKILLed and its AOF cut back to that length before it restarts: what a power cut leaves under
    ``appendfsync everysec`` (the page cache's last second never reached the disk). Verdicts written in that
    second are gone from Redis though readers saw them, their images' acks too: the images are judged again and
    their verdicts published a second time, each naming the same image stream entry."""
    fig, t0 = Figures("the last second of the AOF lost (power cut under appendfsync everysec)"), time.monotonic()
    with environment(workdir) as env:
        w = env.worker("w0").wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "aof")
        fig.sent, want = n, set(ids)
        fk.wait_until(lambda: subs.count(want) >= n // 2, 300)
        aof = Path(env.server.data_dir) / "appendonly.aof"
        synced, seen = aof.stat().st_size, subs.count(want)
        time.sleep(1.0)
        before_cut = subs.count(want)
        env.server.crash()
        with open(aof, "r+b") as fh:
            fh.truncate(synced)
        env.server.start()
        fig.restarts = 1
        log(f"  cut the AOF back 1 s (to {synced} bytes) at {seen}/{n} verdicts; {before_cut - seen} verdicts were "
            f"written in that second; worker alive: {w.alive()}")
        settle(env, subs, ids, fig, timeout_s=600)
        fig.extra.update(written_in_lost_second=before_cut - seen, unflagged_duplicates=subs.unflagged_duplicates(),
                         worker_alive_throughout=w.alive())
        stop_all(env, fig)
    fig.seconds = time.monotonic() - t0
    return fig


def poison(workdir: Path, n: int = 2000, n_poison: int = 3, log: Log = print) -> Figures:
    """``n_poison`` images that make the model SIGKILL its process (tests/fixtures/poison_model.py), spread
    among ``n`` valid ones; two workers, each restarted whenever it dies, as an orchestrator would. Only the
    poison may reach the dead letters (after max_deliveries = 3); every other image gets its verdict."""
    from pipeline import Detector, load_sample_digits

    fig, t0 = Figures(f"{n_poison} messages that kill their worker process, among {n}"), time.monotonic()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(FIXTURES))  # the worker processes import the factory, and so does this one
    import poison_model

    bundle = Detector.from_model(poison_model.build(), input_size=28, channels=1, name="poisoned",
                                 factory="poison_model:build")
    bundle.calibrate(load_sample_digits().images[:200], 0.05)
    folder = bundle.save(Path(workdir) / "poisoned")
    options = ["--detector", str(folder), "--trust-code", "--max-deliveries", "3"]
    with environment(workdir) as env:
        subs = fk.Subscribers(env.server.url, env.names)
        images = digits(n)
        poison_at = set(np.linspace(n // 10, n - n // 10, n_poison).astype(int).tolist())
        ids, entries = [], []
        for k in range(n):
            image = np.full((28, 28), 255, np.uint8) if k in poison_at else images[k]
            ids.append(f"p-{k}")
            entries.append({"data": wire.encode_request(ids[-1], image, model="poisoned")})
        push(env.client, env.names.images, entries)
        fig.sent = n
        live = [env.worker(f"w{i}", *options).wait_ready() for i in range(2)]
        valid = {i for k, i in enumerate(ids) if k not in poison_at}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if subs.count(valid) == len(valid) and len(fk.dead_letters(env.client, env.names)) >= n_poison:
                break
            for k, w in enumerate(live):
                if not w.alive():
                    fig.restarts += 1
                    live[k] = env.worker(f"w{k}-r{fig.restarts}", *options).wait_ready()
            time.sleep(0.2)
        dead = fk.dead_letters(env.client, env.names)
        settle(env, subs, sorted(valid), fig, timeout_s=60)
        fig.bad = n_poison
        fig.dead_lettered = len(dead)
        poison_ids = {ids[k] for k in poison_at}
        dead_ids = {wire.decode_request(d["payload"]).id for d in dead.values() if d.get("payload")}
        fig.lost += len(poison_ids - dead_ids)
        fig.extra.update(worker_deaths=fig.restarts, dead_letters_other_than_poison=len(dead_ids - poison_ids),
                         dead_kinds=sorted({d.get("kind") for d in dead.values()}))
        log(f"  {fig.restarts} worker deaths; dead letters {sorted(dead_ids)}")
        stop_all(env, fig)
    fig.seconds = time.monotonic() - t0
    return fig


def verdict_overrun(workdir: Path, n: int = 3000, maxlen: int = 1000, log: Log = print) -> Figures:
    """A reader with its own consumer group on the verdict stream reads nothing while ``n`` verdicts are
    written under ``MAXLEN ~ maxlen``; then it reads. The cap trims by length whatever the group has read:
    the reader gets about ``maxlen`` of them (docs/wire.md says so, and how to size the cap)."""
    fig, t0 = Figures(f"verdict stream capped at ~{maxlen} while a reader group reads nothing"), time.monotonic()
    with environment(workdir) as env:
        env.client.xgroup_create(env.names.verdicts, "late-reader", id="0", mkstream=True)
        env.worker("w0", "--verdict-maxlen", str(maxlen)).wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "ov")
        fig.sent = n
        settle(env, subs, ids, fig, timeout_s=600)
        got = 0
        while reply := env.client.xreadgroup("late-reader", "r", {env.names.verdicts: ">"}, count=1000):
            got += sum(len(entries) for _s, entries in reply)
        fig.extra.update(late_reader_got=got, maxlen=maxlen, missed_by_late_reader=n - got)
        log(f"  a live reader saw {fig.verdicts}; the late group got {got} of {n}")
        stop_all(env, fig)
    fig.seconds = time.monotonic() - t0
    return fig
