"""Reliability scenarios for the Ray Serve deployment: SIGKILL a Serve replica mid-stream, SIGTERM
``explainer serve`` under load, and the HTTP route's limits. See :mod:`reliability` for the others."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import faultkit as fk
import numpy as np
import psutil
from reliability import Figures, Log, digits, environment, finish_with, push, push_valid, settle

from worker.local_redis import free_port
from worker.streams import StreamNames


def replica_pid(deployment: str, app: str = "explainer", timeout_s: float = 60.0) -> int:
    """The PID of a live Serve replica of ``deployment`` (Ray titles it ``ray::ServeReplica:<app>:<name>``),
    waiting up to ``timeout_s`` for one: a replica being replaced has no such process for a moment (once, in a
    full slow run, the lookup found none)."""
    title = f"ServeReplica:{app}:{deployment}"

    def find() -> int | None:
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(title in part for part in (p.info["cmdline"] or [])):
                return p.info["pid"]
        return None

    found: list[int | None] = []
    if not fk.wait_until(lambda: found.append(find()) or found[-1] is not None, timeout_s, poll_s=0.5):
        raise LookupError(f"no process titled {title} within {timeout_s:.0f} s")
    return found[-1]


def serve_replica_kill(workdir: Path, n: int = 2000, log: Log = print) -> Figures:
    """The Serve app consumes the stream; at 1/4 of the verdicts the Explainer replica (Captum, mid-batch) is
    SIGKILLed, at 1/2 the Ingress replica (which holds the stream consumers and their pending batches)."""
    from worker.embedded import embedded_stack

    fig, t0 = Figures("kill -9 a Ray Serve replica mid-stream (Explainer, then Ingress)"), time.monotonic()
    os.environ["PYTHONPATH"] = fk.child_env()["PYTHONPATH"]  # Ray's workers import this checkout
    with environment(workdir) as env:
        overrides = {"claim_idle_ms": 2000, "block_ms": 100, "streams": dataclasses.asdict(env.names)}
        with embedded_stack(redis_url=env.server.url, data_dir=workdir / "stack", http_port=free_port(),
                            overrides=overrides, num_cpus=2) as stack:
            subs = fk.Subscribers(env.server.url, env.names)
            ids = push_valid(env, n, "sv")
            fig.sent, want = n, set(ids)
            for k, deployment in enumerate(("Explainer", "Ingress")):
                fk.wait_until(lambda k=k: subs.count(want) >= (k + 1) * n // 4, 600)
                pid = replica_pid(deployment)
                os.kill(pid, signal.SIGKILL)
                fig.restarts += 1
                log(f"  killed the {deployment} replica (pid {pid}) at {subs.count(want)}/{n} verdicts")
            settle(env, subs, ids, fig, timeout_s=900)
            fig.extra["new_replica_pids"] = {d: replica_pid(d) for d in ("Explainer", "Ingress")}
            fig.extra["http"] = http_limits(stack.http_url)
            with urllib.request.urlopen(stack.http_url + "/healthz", timeout=30) as r:
                health = json.loads(r.read())
            # replicas import this checkout (trim counters are new here), not another installed copy
            fig.extra["replicas_run_this_checkout"] = all("trimmed" in c for c in health["consumers"])
    fig.seconds = time.monotonic() - t0
    return fig


def _post(url: str, body: bytes, content_type: str = "image/png", chunked: bool = False) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        if chunked:  # no Content-Length: the server must count while it reads
            conn.request("POST", "/detect", body=iter([body[k : k + 65536] for k in range(0, len(body), 65536)]),
                         headers={"Content-Type": content_type}, encode_chunked=True)
        else:
            conn.request("POST", "/detect", body=body, headers={"Content-Type": content_type})
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException):
        return -1  # the server may close the connection after refusing the body
    finally:
        conn.close()


def http_limits(http_url: str) -> dict:
    """Status codes of the HTTP route for a valid PNG and for bodies it must refuse."""
    digit = digits(1)[0]
    png = cv2.imencode(".png", digit)[1].tobytes()
    return {
        "valid PNG": _post(http_url, png),
        "text body": _post(http_url, b"definitely not an image", "text/plain"),
        "msgpack request body": _post(http_url, fk.valid_request("x", digit, 0), "application/msgpack"),
        "truncated PNG": _post(http_url, png[: len(png) // 2]),
        "PNG of the wrong size": _post(http_url, cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes()),
        "9 MiB body, chunked (limit 8 MiB)": _post(http_url, os.urandom(9 * 2**20), chunked=True),
    }


def serve_sigterm(workdir: Path, n: int = 2000, log: Log = print) -> Figures:
    """``explainer serve`` (its own Ray, our Redis) is SIGTERMed at 1/3 of the stream: it must finish and ack
    its batches and exit 0; a standalone worker then finishes the stream."""
    fig, t0 = Figures("SIGTERM `explainer serve` (Ray Serve) during load"), time.monotonic()
    names = StreamNames()  # `explainer serve` consumes the default names
    with environment(workdir, names=names) as env:
        port = free_port()
        log_path = Path(workdir) / "serve.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--redis-url", env.server.url,
                                     "--http-port", str(port), "--data-dir", str(Path(workdir) / "serve")],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=fk.ROOT, env=fk.child_env())
            try:
                if not fk.wait_until(lambda: _healthy(f"http://127.0.0.1:{port}"), 300, poll_s=1):
                    raise RuntimeError(f"explainer serve did not come up: {log_path}")
                subs = fk.Subscribers(env.server.url, env.names)
                ids = push_valid(env, n, "ss")
                fig.sent = n
                fk.wait_until(lambda: subs.count(set(ids)) >= n // 3, 600)
                at = subs.count(set(ids))
                in_flight = fk.pending(env.client, env.names)
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(180)
            finally:
                if proc.poll() is None:
                    proc.kill()
        fig.exit_codes.append(rc)
        fig.extra.update(in_flight_at_sigterm=in_flight, verdicts_at_sigterm=at,
                         verdicts_after_exit=subs.count(set(ids)),
                         pending_after_exit=fk.pending(env.client, env.names))
        log(f"  SIGTERM at {at}/{n} verdicts with {in_flight} in flight: exit {rc}, "
            f"{fig.extra['pending_after_exit']} pending after exit")
        finish_with(env, subs, ids, fig, "finisher")
    fig.seconds = time.monotonic() - t0
    return fig


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return json.loads(r.read()).get("consumers_alive", 0) > 0
    except OSError:
        return False


def hung_stage(workdir: Path, n: int = 600, log: Log = print) -> Figures:
    """The Serve app serves a model that never returns on an all-grey image (tests/fixtures/poison_model.py);
    one such image among ``n``. The Explainer abandons a merged call after ``stage_timeout_s`` (3 s) and serves on
    with a fresh thread; the consumers retry a failed batch image by image; the grey image reaches the dead
    letters after max_deliveries (3), every other gets its verdict, and the Explainer replica is not replaced."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(fixtures), fk.child_env()["PYTHONPATH"]])
    try:
        return _hung_stage(workdir, n, log, fixtures)
    finally:  # the Ray workers have it; later tests' subprocesses must not (they test an installed copy)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _hung_stage(workdir: Path, n: int, log: Log, fixtures: Path) -> Figures:
    from pipeline import Detector, load_sample_digits
    from worker import wire
    from worker.embedded import embedded_stack

    fig, t0 = Figures(f"a model call that never returns (1 image among {n}), Ray Serve"), time.monotonic()
    sys.path.insert(0, str(fixtures))
    import poison_model

    det = Detector.from_model(poison_model.build(), input_size=28, channels=1, name="poisoned",
                              factory="poison_model:build")
    det.calibrate(load_sample_digits().images[:200], 0.05)
    bundle = det.save(workdir / "poisoned")
    with environment(workdir) as env:
        overrides = {"claim_idle_ms": 2000, "block_ms": 100, "max_deliveries": 3, "stage_timeout_s": 3.0,
                     "streams": dataclasses.asdict(env.names), "detector": [str(bundle)], "trust_code": True}
        with embedded_stack(redis_url=env.server.url, data_dir=workdir / "stack", http_port=free_port(),
                            overrides=overrides, num_cpus=2):
            subs = fk.Subscribers(env.server.url, env.names)
            explainer_before = replica_pid("Explainer")
            images = digits(n)
            hang_at = n // 2
            ids = [f"h-{k}" for k in range(n)]
            entries = [{"data": wire.encode_request(i, np.full((28, 28), 128, np.uint8) if k == hang_at else
                                                    images[k], model="poisoned")} for k, i in enumerate(ids)]
            push(env.client, env.names.images, entries)
            fig.sent, fig.bad = n, 1
            valid = [i for k, i in enumerate(ids) if k != hang_at]
            fk.wait_until(lambda: subs.count(set(valid)) + len(fk.dead_letters(env.client, env.names)) >= n, 900)
            settle(env, subs, valid, fig, timeout_s=60)
            dead = fk.dead_letters(env.client, env.names)
            dead_ids = {wire.decode_request(d["payload"]).id for d in dead.values() if d.get("payload")}
            fig.extra["valid_dead_lettered"] = sorted(dead_ids - {ids[hang_at]})
            fig.dead_lettered = len(dead)
            fig.extra["dead_kinds"] = sorted({d.get("kind") for d in dead.values()})
            explainer_after = replica_pid("Explainer")
            fig.restarts = int(explainer_after != explainer_before)
            fig.extra["explainer_replaced"] = explainer_after != explainer_before
            log(f"  dead letters {len(dead)} ({fig.extra['dead_kinds']}); Explainer replaced: "
                f"{fig.extra['explainer_replaced']}")
    fig.seconds = time.monotonic() - t0
    return fig
