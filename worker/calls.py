"""Threads for blocking model calls that may never return.

A Python thread cannot be interrupted, so a model that hangs on some input (a driver call that never comes back, a
loop that never ends) would hold its thread for ever and, once every thread of a stage hangs, the whole stage. An
:class:`AbandonableThreads` executor runs each call on one of a fixed number of long-lived daemon threads (each
keeps its OpenMP team and kernels warm across calls) and lets the caller *abandon* a call that ran too long: a new
thread takes the stuck one's place at once, the stuck one exits if its call ever returns, and the stage keeps its
full width for everyone else's work. The abandoned threads still running are counted, so that a replica whose
model hangs again and again can be replaced (its stuck threads hold memory, and a device's context).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class AbandonableThreads(Executor):
    """``workers`` daemon threads taking calls from one queue; :meth:`abandon` gives up on one running call."""

    def __init__(self, workers: int, name: str = "call") -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._lock = threading.Lock()
        self._running: dict[Future, int] = {}  # each running call's future → its thread's ident
        self._abandoned: set[int] = set()  # threads whose call was given up on and has not returned
        self._started = 0
        self._closed = False
        for _ in range(workers):
            self._start_thread()

    def _start_thread(self) -> None:
        self._started += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._started}", daemon=True).start()

    def _work(self) -> None:
        me = threading.get_ident()
        while True:
            job = self._queue.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            with self._lock:
                self._running[future] = me
            if not future.set_running_or_notify_cancel():
                with self._lock:
                    self._running.pop(future, None)
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._lock:
                self._running.pop(future, None)
                if me in self._abandoned:  # replaced while it hung: the replacement does its work now
                    self._abandoned.discard(me)
                    return

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("these threads were shut down")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def abandon(self, future: Future) -> bool:
        """Give up on ``future``'s call: cancelled if it has not started, else its thread is left to finish (or
        hang) alone and a new thread takes its place. True when a running call was abandoned."""
        if future.cancel():
            return False
        with self._lock:
            thread = self._running.pop(future, None)
            if thread is None:  # it finished meanwhile
                return False
            self._abandoned.add(thread)
            self._start_thread()
        return True

    @property
    def abandoned(self) -> int:
        """Abandoned calls still running (their threads stuck)."""
        with self._lock:
            return len(self._abandoned)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once the queued calls are done (abandoned threads are daemons: never waited for)."""
        self._closed = True
        for _ in range(self._started):
            self._queue.put(None)
