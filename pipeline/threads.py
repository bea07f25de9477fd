"""One process-wide thread pool for the CPU stages that call OpenCV (NLM, inpainting): OpenCV releases the GIL,
so a batch cut into one chunk per core runs on every core at once."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()


def cpu_pool() -> ThreadPoolExecutor:
    """The pool, one thread per core, made on first use (under a lock: the Serve Explainer's threads may race)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="opencv",
                                       initializer=lambda: setattr(_IN_POOL, "yes", True))
        return _POOL


def map_chunks(fn: Callable[[np.ndarray, np.ndarray], None], images: np.ndarray, out: np.ndarray,
               workers: int | None = None) -> None:
    """``fn(images[a:b], out[a:b])`` over one contiguous chunk per worker (default: one per core), on the pool;
    on the calling thread when one worker or one image is left, or when called from a pool thread (its chunks
    would wait for threads that are all busy waiting)."""
    n_workers = min(len(images), workers or (os.cpu_count() or 1))
    if n_workers <= 1 or getattr(_IN_POOL, "yes", False):
        fn(images, out)
        return
    bounds = np.linspace(0, len(images), n_workers + 1).astype(int)
    futures = [cpu_pool().submit(fn, images[a:b], out[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
               if b > a]
    for f in futures:
        f.result()
