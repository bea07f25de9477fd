"""CPU time of every process on this machine, grouped by the part of the stack it is (a Serve replica, Ray's own
processes, redis-server), from /proc: what ``explainer bench`` reads before
and after a streaming burst to say where its CPU went. Linux only; elsewhere it reads nothing."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
REPLICAS = ("Ingress", "Denoiser", "Explainer", "Scorer")
_OTHERS = (("ServeController", "Serve controller"), ("ProxyActor", "Serve proxy"), ("redis-server", "redis-server"),
           ("raylet", "raylet"), ("gcs_server", "gcs_server"), ("py-spy", "py-spy"))


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user+system CPU seconds) for every process we can read."""
    out = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = (cmd or stat.split("(", 1)[1].split(")")[0], (int(fields[11]) + int(fields[12])) / TICK)
    return out


def label(cmd: str, own_pid_label: str | None = None, pid: int | None = None) -> str:
    """The part of the stack a command line belongs to; this process is ``own_pid_label`` when given."""
    if own_pid_label and pid == os.getpid():
        return own_pid_label
    for name in REPLICAS:
        if f"ServeReplica:explainer:{name}" in cmd:
            return name
    for key, name in _OTHERS:
        if key in cmd:
            return name
    return "other Ray / system" if "ray" in cmd else "other"


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 own: str = "this process") -> dict[str, float]:
    """CPU seconds each part of the stack used between two :func:`cpu_seconds` readings (processes that ran
    through both), largest first."""
    used: dict[str, float] = defaultdict(float)
    for pid, (cmd, secs) in after.items():
        if pid in before:
            used[label(cmd, own, pid)] += secs - before[pid][1]
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))
