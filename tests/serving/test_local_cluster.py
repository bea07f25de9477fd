"""LocalCluster: a real Redis Cluster on loopback (redis-cli --cluster create), driven through redis-py's
RedisCluster: hash-tag placement, Lua on co-located keys, consumer groups, a master killed and restarted with its
AOF, and a master killed with a replica to promote."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from worker.local_cluster import LocalCluster, free_cluster_port
from worker.wire import CLUSTER_SLOTS

pytestmark = pytest.mark.timeout(120)

# what a client needs to ride out a master down for a few seconds (restart, or failover to its replica):
# about 0.1 + 0.2 + 0.4 + 37 x 0.5 = 19 s of retries (the default, 10 jittered retries, gives up after ~3-4 s)
RIDE_OUT = dict(retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40), socket_timeout=5, socket_connect_timeout=1)


def slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def tag_on_other_master(cluster: LocalCluster, not_port: int) -> str:
    return next(f"s{i}" for i in range(100) if cluster.master_of_slot(slot(f"{{s{i}}}"))[1] != not_port)


def wait_replicated(replica_port: int, stream: str, length: int, timeout_s: float = 10.0) -> None:
    with redis.Redis(host="127.0.0.1", port=replica_port) as replica:
        replica.execute_command("READONLY")
        deadline = time.monotonic() + timeout_s
        while replica.xlen(stream) < length:
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(masters=3) as running:
        yield running


@pytest.fixture
def rc(cluster) -> redis.RedisCluster:
    c = cluster.client()
    yield c
    c.close()


def test_free_cluster_port_leaves_room_for_the_bus_port():
    for _ in range(20):
        port = free_cluster_port()
        assert port + 10000 <= 65535


def test_cluster_starts_with_three_masters_covering_every_slot(cluster, rc):
    assert len(cluster.nodes) == 3 and len(cluster.ports) == 3
    assert cluster.url == f"redis+cluster://127.0.0.1:{cluster.nodes[0][1]}"
    assert cluster.ok()
    assert cluster.start_seconds < 30
    info = rc.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == CLUSTER_SLOTS
    assert sorted(cluster.masters_now()) == sorted(cluster.nodes)
    assert rc.ping() is True


def test_hash_tags_land_on_different_masters(cluster, rc):
    masters = {tag: cluster.master_of_slot(slot(f"{{{tag}}}:a")) for tag in ("s0", "s2", "s3")}
    assert len(set(masters.values())) == 3  # slots 11097, 2843, 6970: one in each third
    assert set(masters.values()) == set(cluster.nodes)
    for tag, (host, port) in masters.items():
        rc.xadd(f"{{{tag}}}:place", {"v": tag})
        # the entry really lives on that master: a plain client on it reads it without a MOVED
        with redis.Redis(host=host, port=port) as node:
            assert node.xlen(f"{{{tag}}}:place") == 1
    assert slot("{s0}:a") == slot("{s0}:b") == slot("{s0}")


def test_lua_script_on_two_keys_with_the_same_hash_tag(rc):
    script = rc.register_script(
        "local a = redis.call('XADD', KEYS[1], '*', 'f', ARGV[1]) "
        "local b = redis.call('XADD', KEYS[2], '*', 'f', ARGV[1]) "
        "return {a, b}"
    )
    for tag in ("s0", "s2", "s3"):  # EVALSHA on every master: redis-py loads the script where it is missing
        a, b = script(keys=[f"{{{tag}}}:a", f"{{{tag}}}:b"], args=["x"])
        assert a and b
        assert rc.xlen(f"{{{tag}}}:a") == rc.xlen(f"{{{tag}}}:b") == 1
    with pytest.raises(RedisClusterException, match="same key slot"):
        script(keys=["{s0}:a", "{s2}:b"], args=["x"])


def test_consumer_group_on_a_tagged_stream(cluster, rc):
    stream = "{s3}:jobs"
    rc.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = [rc.xadd(stream, {"n": str(i)}) for i in range(3)]
    got = rc.xreadgroup("workers", "w1", {stream: ">"}, count=10)
    assert [m for m, _ in got[0][1]] == ids
    assert rc.xack(stream, "workers", *ids) == 3
    assert rc.xpending(stream, "workers")["pending"] == 0

    # a blocking read wakes up on an entry another client adds (socket_timeout must outlast the block)
    late: list[bytes] = []

    def add_later():
        time.sleep(0.2)
        with cluster.client() as other:
            late.append(other.xadd(stream, {"n": "late"}))

    t = threading.Thread(target=add_later)
    t.start()
    t0 = time.monotonic()
    got = rc.xreadgroup("workers", "w1", {stream: ">"}, count=1, block=5000)
    t.join()
    assert time.monotonic() - t0 < 4
    assert got[0][1][0][0] == late[0]
    assert rc.xreadgroup("workers", "w1", {stream: ">"}, count=1, block=100) == []


def test_non_transactional_pipeline_spans_slots(rc):
    pipe = rc.pipeline(transaction=False)
    for tag in ("s0", "s2", "s3"):
        pipe.xadd(f"{{{tag}}}:pipe", {"v": 1})
        pipe.xlen(f"{{{tag}}}:pipe")
    replies = pipe.execute()
    assert replies[1::2] == [1, 1, 1]


def test_kill_and_restart_a_master_keeps_its_data(tmp_path):
    with LocalCluster(masters=3, replicas=0, data_dir=tmp_path / "cluster") as cluster:
        rc = cluster.client()
        stream = "{s0}:durable"
        _, victim = cluster.master_of_slot(slot(stream))
        other = f"{{{tag_on_other_master(cluster, victim)}}}:durable"
        ids = [rc.xadd(stream, {"n": str(i)}) for i in range(20)]
        rc.xgroup_create(stream, "g", id="0")
        rc.xreadgroup("g", "c", {stream: ">"}, count=5)

        cluster.kill(victim)
        assert not cluster.running(victim)
        # a client with one retry gives up on the dead master with a ConnectionError
        with cluster.client(retry=Retry(NoBackoff(), 1)) as impatient, pytest.raises(redis.ConnectionError):
            impatient.xadd(stream, {"n": "lost"})

        # one that retries long enough rides out the restart (AOF with appendfsync always: nothing lost)
        restarter = threading.Timer(1.0, cluster.restart, args=(victim,))
        restarter.start()
        with cluster.client(**RIDE_OUT) as patient:
            t0 = time.monotonic()
            late = patient.xadd(stream, {"n": "late"})
            other_id = patient.xadd(other, {"n": "other"})
            assert time.monotonic() - t0 < 15
        restarter.join()
        cluster.wait_ok(30)

        assert cluster.master_of_slot(slot(stream)) == ("127.0.0.1", victim)
        assert [m for m, _ in rc.xrange(stream)] == [*ids, late]
        assert rc.xpending(stream, "g")["pending"] == 5
        assert [m for m, _ in rc.xrange(other)] == [other_id]
        rc.close()

    # a new LocalCluster on the same data_dir resumes the same nodes, ports and data (no new --cluster create)
    again = LocalCluster(masters=3, replicas=0, data_dir=tmp_path / "cluster")
    with again:
        assert ("127.0.0.1", victim) in again.nodes
        with again.client() as rc:
            assert rc.xlen(stream) == 21


def test_killed_master_is_replaced_by_its_replica():
    with LocalCluster(masters=3, replicas=1) as cluster:
        assert len(cluster.ports) == 6
        rc = cluster.client(**RIDE_OUT)
        stream = "{s0}:failover"
        _, victim = cluster.master_of_slot(slot(stream))
        [(_, replica)] = cluster.replicas_of(victim)
        ids = [rc.xadd(stream, {"n": str(i)}) for i in range(10)]
        wait_replicated(replica, stream, 10)  # replication is async: a SIGKILL too soon could lose the tail
        script = rc.register_script("return redis.call('XLEN', KEYS[1])")
        assert script(keys=[stream]) == 10

        cluster.kill(victim)
        t0 = time.monotonic()
        cluster.wait_ok(30)
        assert time.monotonic() - t0 < 20
        assert cluster.master_of_slot(slot(stream)) == ("127.0.0.1", replica)

        assert [m for m, _ in rc.xrange(stream)] == ids
        rc.xadd(stream, {"n": "after"})
        assert script(keys=[stream]) == 11

        # the old master comes back as a replica of the promoted one
        cluster.restart(victim).wait_ok(30)
        assert cluster.master_of_slot(slot(stream)) == ("127.0.0.1", replica)
        assert ("127.0.0.1", victim) in cluster.replicas_of(replica)
        rc.close()
