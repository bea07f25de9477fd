"""evaluation.proc_cpu: the bench's per-process CPU accounting counts a real process's CPU under the right label."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation.proc_cpu import cpu_by_label, cpu_seconds, label

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 3.0: pass\ntime.sleep(30)"


def test_a_busy_process_is_counted_under_its_label():
    child = subprocess.Popen([sys.executable, "-c", BUSY + "  # redis-server"])
    try:
        time.sleep(0.2)
        before = cpu_seconds()
        assert child.pid in before
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cpu_seconds()[child.pid][1] - before[child.pid][1] < 0.3:
            time.sleep(0.1)
        used = cpu_by_label(before, cpu_seconds(), own="bench")
    finally:
        child.kill()
    # the child's command line names redis-server, so it is counted as that part of the stack; this process as "bench"
    assert used["redis-server"] >= 0.3
    assert "bench" in used
    assert list(used.values()) == sorted(used.values(), reverse=True)


def test_labels():
    assert label("ray::ServeReplica:explainer:Explainer") == "Explainer"
    assert label("/x/ray/core/src/ray/raylet/raylet --node") == "raylet"
    assert label("python -m something_ray_related") == "other Ray / system"
    assert label("bash") == "other"
