"""Fixtures of the serving tests that talk to a real redis-server: one server per module, a client per test."""

from __future__ import annotations

import pytest
import redis

from worker.local_redis import LocalRedis
from worker.streams import connect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalRedis(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture
def client(server) -> redis.Redis:
    c = connect(server.url)
    yield c
    c.close()

