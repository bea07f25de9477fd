"""Subscriber side: wait for the verdicts of given message ids on the durable verdict streams (one per shard)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis

from worker import wire
from worker.feed import push_images
from worker.streams import StreamNames, is_cluster


def last_id(client: redis.Redis, stream: str) -> str:
    """The id of the newest entry of ``stream`` ("0-0" when empty): read verdicts after it."""
    newest = client.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


class VerdictReader:
    """Follows the verdict stream of every shard (``names.shards(shards)``) from given positions: one ``XREAD``
    over all of them on one Redis, one per shard on a cluster (whose multi-key reads must stay in one slot)."""

    def __init__(self, client: redis.Redis, names: StreamNames, shards: int = 1,
                 after: str | dict[str, str] = "$") -> None:
        """``after``: read entries after this id in every stream ("$": only new ones; "0-0": all), or a position
        per stream (:meth:`positions` of an earlier reader)."""
        self.client = client
        self.streams = [n.verdicts for n in names.shards(shards, is_cluster(client))]
        if after == "$":  # "$" taken now, so that nothing written between two reads is missed
            after = {s: last_id(client, s) for s in self.streams}
        self.cursors = dict(after) if isinstance(after, dict) else {s: after for s in self.streams}

    def positions(self) -> dict[str, str]:
        """Where each stream has been read up to: an ``after`` for a later reader."""
        return dict(self.cursors)

    def read(self, block_ms: int = 200, count: int = 1000) -> list[tuple[str, bytes]]:
        """The next verdicts, as (entry id, msgpack bytes), waiting up to ``block_ms`` when none is there yet."""
        if len(self.streams) == 1 or not is_cluster(self.client):
            replies = self.client.xread(self.cursors, count=count, block=block_ms or None) or []
        else:
            replies = []
            for stream in self.streams:
                replies += self.client.xread({stream: self.cursors[stream]}, count=count) or []
            if not any(entries for _s, entries in replies) and block_ms:
                time.sleep(min(block_ms, 50) / 1000)
        out = []
        for stream, entries in replies:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for sid, fields in entries:
                self.cursors[stream] = sid = sid.decode() if isinstance(sid, bytes) else sid
                out.append((sid, fields[b"data"]))
        return out


def collect_verdicts(
    client: redis.Redis, names: StreamNames, ids: Iterable[str], after: str | dict[str, str] = "0-0",
    timeout_s: float = 300.0, progress: Callable[[int], None] | None = None, shards: int = 1,
) -> dict[str, dict]:
    """Verdicts by message id for ``ids``, read from the verdict streams of ``shards`` after ``after`` (one id
    for every stream, or :meth:`VerdictReader.positions`).

    Each verdict gains ``written_at``, when Redis wrote it (its entry id's milliseconds). Duplicates (same id
    twice, which the worker's publishing script prevents) keep the first verdict. Stops
    when every id has a verdict or ``timeout_s`` passes; the caller compares the counts.
    """
    wanted = set(ids)
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    reader = VerdictReader(client, names, shards, after)
    while len(got) < len(wanted) and time.monotonic() < deadline:
        for sid, data in reader.read():
            verdict = wire.decode_verdict(data)
            if verdict["id"] in wanted and verdict["id"] not in got:
                verdict["written_at"] = int(sid.split("-")[0]) / 1000  # Redis's clock at XADD
                got[verdict["id"]] = verdict
        if progress:
            progress(len(got))
    return got


def round_trip(client: redis.Redis, names: StreamNames, images, prefix: str, timeout_s: float = 300.0,
               shards: int = 1) -> tuple[list[str], dict[str, dict]]:
    """Push ``images`` with ids ``prefix-0``, ``prefix-1``, ... and wait for their verdicts: (ids, verdicts by
    id): the smoke test of a deployment."""
    ids = [f"{prefix}-{i}" for i in range(len(images))]
    after = VerdictReader(client, names, shards).positions()
    push_images(client, names, images, ids=ids, shards=shards)
    return ids, collect_verdicts(client, names, ids, after, timeout_s=timeout_s, shards=shards)
