"""Helpers of the serving tests that write to a real redis-server."""

from __future__ import annotations

import redis


def delivered(client: redis.Redis, names, n: int, consumer: str = "w") -> list[str]:
    """``n`` new image entries, read into the group by ``consumer`` (a verdict is written only for an entry
    pending in the group), their stream ids in order."""
    sids = [client.xadd(names.images, {"data": b"x"}).decode() for _ in range(n)]
    try:
        client.xgroup_create(names.images, names.group, id="0")
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    [(_, read)] = client.xreadgroup(names.group, consumer, {names.images: ">"}, count=n)
    assert [sid.decode() for sid, _ in read] == sids, "entries of the stream were left unread"
    return sids
