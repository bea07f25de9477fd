"""Parse cost of a stream read of 256 wire-encoded digits: redis-py's pure-Python reply parser against hiredis.

An ad-hoc A/B for docs/method.md (stop 14; its output is reports/streaming_levers/redis_parser.md). hiredis is
not a dependency of the project, so this needs `pip install hiredis` first.

Run: python scripts/redis_parser_ab.py
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import redis
from redis._parsers import _HiredisParser, _RESP2Parser

from pipeline import load_sample_digits
from worker import wire
from worker.local_redis import LocalRedis

ROUNDS, READS, ENTRIES = 5, 50, 256


def main() -> None:
    digits = load_sample_digits().images[:ENTRIES]
    with LocalRedis(tempfile.mkdtemp()) as server:
        writer = redis.Redis.from_url(server.url)
        for i, image in enumerate(digits):
            writer.xadd("s", {"data": wire.encode_request(f"id{i}", image)})
        micros: dict[str, list[float]] = {}
        for _ in range(ROUNDS):  # the two parsers in turn, so that drift hits both
            for name, parser in (("python", _RESP2Parser), ("hiredis", _HiredisParser)):
                client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(server.url, parser_class=parser))
                client.xrange("s", count=ENTRIES)
                t = time.perf_counter()
                for _ in range(READS):
                    client.xrange("s", count=ENTRIES)
                micros.setdefault(name, []).append((time.perf_counter() - t) / READS / ENTRIES * 1e6)
    for name, values in micros.items():
        print(f"{name}: µs per entry by round {np.round(values, 1).tolist()}, median {np.median(values):.1f}")


if __name__ == "__main__":
    main()
