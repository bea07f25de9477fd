"""Producer side: push images into the image stream in the wire format (used by tests, demos, the CLI)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from itertools import zip_longest

import numpy as np
import redis

from worker import wire
from worker.streams import StreamNames


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
    maxlen: int | None = None,
) -> list[str]:
    """XADD one request per image (field ``data``), ``pipeline_size`` per round trip; returns the stream
    ids in order. ``ids`` default to random UUIDs; ``meta["enqueued_at"]`` is set to the time of pushing.
    ``maxlen`` caps the image stream (approximate MAXLEN) when given."""
    out: list[str] = []
    pipe = client.pipeline(transaction=False)
    pending = 0
    sentinel = object()
    for image, rid in zip_longest(images, ids if ids is not None else [], fillvalue=sentinel):
        if image is sentinel:
            raise ValueError("more ids than images")
        if rid is sentinel:
            if ids is not None:
                raise ValueError("more images than ids")
            rid = uuid.uuid4().hex
        m = {**(meta or {}), "enqueued_at": time.time()}
        data = wire.encode_request(rid, image, encoding=encoding, model=model, heatmap=heatmap, meta=m)
        pipe.xadd(names.images, {"data": data}, maxlen=maxlen, approximate=True)
        pending += 1
        if pending >= pipeline_size:
            out += [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]
            pending = 0
    if pending:
        out += [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]
    pipe.reset()
    return out
