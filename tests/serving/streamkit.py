"""Helpers of the serving tests that write to a real redis-server."""

from __future__ import annotations

import http.server
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import redis

SERVE = "from ray.serve.scripts import cli; cli()"  # the `serve` console script's entry point


def delivered(client: redis.Redis, names, n: int, consumer: str = "w") -> list[str]:
    """``n`` new image entries, read into the group by ``consumer`` (a verdict is written only for an entry
    pending in the group), their stream ids in order."""
    sids = [client.xadd(names.images, {"data": b"x"}).decode() for _ in range(n)]
    try:
        client.xgroup_create(names.images, names.group, id="0")
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    [(_, read)] = client.xreadgroup(names.group, consumer, {names.images: ">"}, count=n)
    assert [sid.decode() for sid, _ in read] == sids, "entries of the stream were left unread"
    return sids


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Until ``GET /healthz`` answers on ``port``; fails with the log's tail when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve run exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no /healthz after {timeout_s} s:\n{log.read_text()[-4000:]}")


class Files(http.server.ThreadingHTTPServer):
    """``GET /<name>`` answers ``files[name]`` or 404."""

    def __init__(self, files: dict[str, bytes], port: int = 0) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def stop_serve_run(proc: subprocess.Popen) -> None:
    """``serve run``'s Ctrl-C (it shuts Serve down and its Ray with it), killed when it takes over 90 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
