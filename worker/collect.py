"""Subscriber side: wait for the verdicts of given message ids on the durable verdict stream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis

from worker import wire
from worker.feed import push_images
from worker.streams import StreamNames


def last_id(client: redis.Redis, stream: str) -> str:
    """The id of the newest entry of ``stream`` ("0-0" when empty): read verdicts after it."""
    newest = client.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


def collect_verdicts(
    client: redis.Redis, names: StreamNames, ids: Iterable[str], after: str = "0-0", timeout_s: float = 300.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Verdicts by message id for ``ids``, read from the verdict stream after entry ``after``.

    Each verdict gains ``written_at``, when Redis wrote it (its entry id's milliseconds). Duplicates (same id
    twice, which the worker's publishing script prevents) keep the first verdict. Stops
    when every id has a verdict or ``timeout_s`` passes; the caller compares the counts.
    """
    wanted = set(ids)
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    cursor = after
    while len(got) < len(wanted) and time.monotonic() < deadline:
        reply = client.xread({names.verdicts: cursor}, count=1000, block=200)
        for _stream, entries in reply or []:
            for sid, fields in entries:
                cursor = sid.decode()
                verdict = wire.decode_verdict(fields[b"data"])
                if verdict["id"] in wanted and verdict["id"] not in got:
                    verdict["written_at"] = int(cursor.split("-")[0]) / 1000  # Redis's clock at XADD
                    got[verdict["id"]] = verdict
        if progress:
            progress(len(got))
    return got


def round_trip(client: redis.Redis, names: StreamNames, images, prefix: str, timeout_s: float = 300.0
               ) -> tuple[list[str], dict[str, dict]]:
    """Push ``images`` with ids ``prefix-0``, ``prefix-1``, ... and wait for their verdicts: (ids, verdicts by
    id): the smoke test of a deployment."""
    ids = [f"{prefix}-{i}" for i in range(len(images))]
    after = last_id(client, names.verdicts)
    push_images(client, names, images, ids=ids)
    return ids, collect_verdicts(client, names, ids, after, timeout_s=timeout_s)
