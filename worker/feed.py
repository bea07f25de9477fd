"""Producer side: push images into the image stream in the wire format (used by tests, demos, the CLI).

Backpressure, not trimming: ``XADD ... MAXLEN`` on the image stream would delete the oldest entries whether or
not the worker has read them, i.e. drop images silently. Instead a producer may pass ``max_backlog``: when the
stream already holds that many entries it waits for the worker to catch up and, past ``backlog_wait_s``, raises
:class:`BacklogFull` (loudly, naming what was pushed). The worker trims only acked entries
(:meth:`worker.streams.StreamConsumer.trim_acked`), so the stream's length is its backlog.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from itertools import zip_longest

import numpy as np
import redis

from worker import wire
from worker.streams import StreamNames, is_cluster


class BacklogFull(RuntimeError):
    """The image stream stayed at or above ``max_backlog`` entries for ``backlog_wait_s``; ``pushed`` holds
    the stream ids of the images that did get in (the rest were not sent)."""

    def __init__(self, message: str, pushed: list[str]) -> None:
        super().__init__(message)
        self.pushed = pushed


def wait_for_room(
    client: redis.Redis, stream: str, max_backlog: int, timeout_s: float, poll_s: float = 0.05
) -> int:
    """Block until ``stream`` holds fewer than ``max_backlog`` entries; returns its length, or raises
    TimeoutError with the length after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        length = int(client.xlen(stream))
        if length < max_backlog:
            return length
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{stream} still holds {length} entries (max_backlog {max_backlog})")
        time.sleep(poll_s)


def push_requests(
    client: redis.Redis,
    names: StreamNames,
    requests: Iterable[tuple[str, bytes]],
    shards: int = 1,
    pipeline_size: int = 256,
    max_backlog: int | None = None,
    backlog_wait_s: float = 30.0,
) -> list[str]:
    """XADD encoded requests, each given as (shard key, msgpack bytes): the key, the request's ``source`` or else
    its ``id``, picks its image stream among ``shards`` (:func:`worker.wire.shard_of`). ``pipeline_size`` per round
    trip; returns the stream ids in order (each in its shard's stream).

    ``max_backlog``: before each round trip, wait (up to ``backlog_wait_s``) until each image stream it writes to
    holds fewer than this many entries, else raise :class:`BacklogFull`. Nothing already in a stream is ever
    dropped. A round trip then carries at most ``max_backlog`` images, so a stream never exceeds twice the cap. A
    stream's length counts acked entries the worker has not trimmed yet (it trims every few seconds, and keeps the
    last one read), so set the cap well above the worker's read batch (say 10×)."""
    if max_backlog is not None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be at least 1")
        pipeline_size = min(pipeline_size, max_backlog)
    streams = [n.images for n in names.shards(shards, is_cluster(client))]
    out: list[str] = []
    pipe = client.pipeline(transaction=False)
    touched: set[str] = set()

    def flush() -> None:
        if max_backlog is not None:
            try:
                for stream in sorted(touched):
                    wait_for_room(client, stream, max_backlog, backlog_wait_s)
            except TimeoutError as e:
                pipe.reset()
                raise BacklogFull(f"backpressure: {e} after {backlog_wait_s}s; {len(out)} pushed, rest not sent",
                                  out) from None
        out.extend(i.decode() if isinstance(i, bytes) else i for i in pipe.execute())
        touched.clear()

    for key, data in requests:
        stream = streams[wire.shard_of(key, len(streams))]
        pipe.xadd(stream, {"data": data})
        touched.add(stream)
        if len(pipe) >= pipeline_size:
            flush()
    if len(pipe):
        flush()
    pipe.reset()
    return out


def push_images(
    client: redis.Redis,
    names: StreamNames,
    images: Iterable[np.ndarray],
    ids: Iterable[str] | None = None,
    model: str = "mnist",
    encoding: str = "raw",
    meta: dict | None = None,
    pipeline_size: int = 256,
    heatmap: bool = False,
    max_backlog: int | None = None,
    backlog_wait_s: float = 30.0,
    source: str | None = None,
    shards: int = 1,
) -> list[str]:
    """XADD one request per image (field ``data``) with :func:`push_requests`; returns the stream ids in order.
    ``ids`` default to random UUIDs; ``meta["enqueued_at"]`` is set to the time of pushing; ``source``: the camera
    or feed id every request carries (alert windows count per source; it picks the shard, else each id does)."""
    sentinel = object()

    def encoded() -> Iterable[tuple[str, bytes]]:
        for image, rid in zip_longest(images, ids if ids is not None else [], fillvalue=sentinel):
            if image is sentinel:
                raise ValueError("more ids than images")
            if rid is sentinel:
                if ids is not None:
                    raise ValueError("more images than ids")
                rid = uuid.uuid4().hex
            m = {**(meta or {}), "enqueued_at": time.time()}
            yield source or rid, wire.encode_request(rid, image, encoding=encoding, model=model, heatmap=heatmap,
                                                     meta=m, source=source)

    return push_requests(client, names, encoded(), shards=shards, pipeline_size=pipeline_size,
                         max_backlog=max_backlog, backlog_wait_s=backlog_wait_s)
