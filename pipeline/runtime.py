"""Process-wide settings for CPU inference: keep the memory of a batch mapped between passes.

glibc's malloc serves a block above its mmap threshold with freshly mapped pages and unmaps it on free; the
threshold starts low and moves up only when such a block is freed, and the top of the heap is handed back to the
kernel above a trim threshold. A batch's activations are allocated and freed on every forward and backward pass,
so every pass would fault its pages in again and the kernel would zero them, and how often depends on what the
process allocated before (the moving threshold). Fixing the mmap threshold at its maximum and trimming only above
1 GiB keeps the pages mapped (``tests/core/test_runtime.py`` counts the faults). The worker threads' arenas,
whose heaps glibc frees whole regardless of the trim threshold, are left to ``MALLOC_ARENA_MAX``.

The cost is resident memory: what a process freed stays mapped for its next batch (blocks above the threshold,
e.g. a big batch of photos, are still unmapped on free). With batches of varying sizes on several threads the
kept memory fragments and grows: on two threads and batches of 1 to 256 digits, 2 GiB in 4,000 calls while the
live Python objects stayed under 3 MiB, and ``malloc_trim`` gave all of it back (the allocator's, not a leak).
:class:`MemoryCeiling` bounds it: a long-running stage trims the heap whenever its resident memory passes its
warm-up size by a set headroom. ``explainer`` calls this at start, and so does every
Ray Serve replica. An operator's own malloc settings win: with MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a
glibc.malloc tunable in GLIBC_TUNABLES set, or EXPLAINER_MALLOC_TUNING=0, nothing changes. (Under an LD_PRELOADed
jemalloc or tcmalloc the call reaches glibc's unused malloc and has no effect.)
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# the largest mmap threshold glibc accepts: HEAP_MAX_SIZE / 2 = 4 MiB * sizeof(long), i.e. 32 MiB on 64-bit
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
TRIM_THRESHOLD = 1 << 30
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _left_to_operator() -> bool:
    return (os.environ.get("EXPLAINER_MALLOC_TUNING", "1") == "0"
            or any(v in os.environ for v in OPERATOR_SETTINGS)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def keep_allocations_mapped() -> bool:
    """Set glibc's mmap threshold to its maximum and its trim threshold to 1 GiB for this process. Returns True
    when both were set; False (and nothing changes) off glibc (macOS, musl), or when the operator's own settings
    are in the environment (module docstring)."""
    if not sys.platform.startswith("linux") or _left_to_operator():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resident_bytes() -> int:
    """This process's resident memory (RSS), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``); False where there is none to
    call (not glibc). It walks the whole heap: about 0.15 s for 2 GiB on this project's test machine."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class MemoryCeiling:
    """Keeps a long-running process's resident memory near its size when :meth:`start` was called (after warm-up):
    :meth:`check`, called between batches, trims the heap when the process is more than ``headroom`` bytes above
    that size, at most once every ``interval_s`` seconds. A trim costs its walk of the heap and the page faults of
    the batches after it, which refill what they use: on two threads and batches of 1 to 256 digits (4,000 calls,
    the worst case for fragmentation), trimming after every call that ended above a 512 MiB headroom took 233 s
    against 159 s untrimmed, and once every 5 s took 172 s; every ``interval_s`` = 30 s costs a sixth of that.
    ``trims`` counts the trims, for the record."""

    def __init__(self, headroom: int = 512 * 2**20, interval_s: float = 30.0) -> None:
        self.headroom = headroom
        self.interval_s = interval_s
        self.baseline = 0
        self.trims = 0
        self._last = 0.0

    def start(self) -> None:
        self.baseline = resident_bytes()
        self._last = time.monotonic()

    def check(self) -> bool:
        """Trim when above the ceiling and the last trim is ``interval_s`` old; True when it trimmed."""
        now = time.monotonic()
        if not self.baseline or now - self._last < self.interval_s:
            return False
        if resident_bytes() <= self.baseline + self.headroom:
            return False
        self._last = now
        trim_heap()
        self.trims += 1
        return True
