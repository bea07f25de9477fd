"""Sharded image streams on one real redis-server: the documented shard choice, each shard's keys in one slot, a
source kept in order on one shard, every shard read and answered, and a dead consumer's shard taken over."""

from __future__ import annotations

import threading
import uuid
import zlib

import pytest
from redis.crc import key_slot

from worker import wire
from worker.collect import VerdictReader, collect_verdicts
from worker.detect import detect_requests
from worker.feed import push_images
from worker.streams import (
    StreamConsumer,
    StreamNames,
    StreamSettings,
    StreamWorker,
    drain,
    iter_stream,
    note_shards,
    served_shards,
)

SHARDS = 3


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"sh-{uuid.uuid4().hex[:8]}")


def shard_workers(client, names, detector, shards=SHARDS, consumer="w", **knobs) -> list[StreamWorker]:
    knobs.setdefault("block_ms", 20)
    out = []
    for shard in names.shards(shards):
        cons = StreamConsumer(client, shard, consumer=consumer, **knobs)
        cons.ensure_group()
        out.append(StreamWorker(cons, lambda reqs: detect_requests(detector, reqs)))
    return out


def test_the_shard_is_crc32_of_the_source_as_documented():
    """A producer in any language computes it: CRC-32 (IEEE) of the key's UTF-8 bytes, modulo the shards."""
    assert [wire.shard_of(key, 4) for key in ("cam-0", "cam-1", "cam-2", "cam-3", "kamera-ü")] == \
        [zlib.crc32(key.encode()) % 4 for key in ("cam-0", "cam-1", "cam-2", "cam-3", "kamera-ü")]
    assert wire.shard_of("123456789", 1 << 32) == 0xCBF43926  # the CRC-32 check value every implementation has
    assert {wire.shard_of(f"cam-{i}", 1) for i in range(50)} == {0}
    assert len({wire.shard_of(f"cam-{i}", 4) for i in range(50)}) == 4
    with pytest.raises(ValueError):
        wire.shard_of("cam", 0)


def test_each_shards_keys_share_one_cluster_slot_and_one_shard_keeps_the_names():
    names = StreamNames()
    assert names.shards(1) == [names]
    for i, shard in enumerate(names.shards(4)):
        keys = [shard.images, shard.verdicts, shard.dead, shard.episodes, f"{shard.window_prefix}cam7",
                f"{shard.probe_prefix}cam7"]
        assert {key_slot(k.encode()) for k in keys} == {wire.key_slot(wire.shard_tag(i, 4))}, keys
        assert (shard.group, shard.alerts) == (names.group, names.alerts)  # one group name, one alert channel
    assert names.shards(1, cluster=True)[0].images == f"explainer:images:{{{wire.shard_tag(0, 1)}}}"
    with pytest.raises(ValueError, match="shards"):
        StreamSettings(shards=0)
    with pytest.raises(ValueError, match="must not hold"):  # a tag of its own would put every shard in one slot
        StreamNames.with_prefix("{explainer}").shards(2)


@pytest.mark.parametrize("masters", [3, 4, 6, 8])
def test_a_shard_count_that_is_a_multiple_of_the_masters_puts_as_many_shards_on_each(masters):
    """Masters own equal slot ranges as ``redis-cli --cluster create`` makes them (the first ones one slot more)."""
    size, extra = divmod(wire.CLUSTER_SLOTS, masters)
    bounds, start = [], 0
    for m in range(masters):
        start += size + (1 if m < extra else 0)
        bounds.append(start)
    for shards in (masters, 2 * masters, 4 * masters):
        owners = [next(m for m, end in enumerate(bounds) if wire.key_slot(wire.shard_tag(i, shards)) < end)
                  for i in range(shards)]
        assert sorted(owners.count(m) for m in range(masters)) == [shards // masters] * masters, (shards, owners)
    assert wire.key_slot("123456789") == 0x31C3 % wire.CLUSTER_SLOTS  # CRC16/XMODEM's check value


def test_every_shard_is_read_and_a_cameras_images_stay_in_order_on_one(client, names, detector, digits):
    cams = [f"cam-{i}" for i in range(6)]
    pushed = {cam: push_images(client, names, digits.images[:20], ids=[f"{cam}-{j}" for j in range(20)],
                               source=cam, shards=SHARDS) for cam in cams}
    shards = names.shards(SHARDS)
    for cam in cams:  # all of a camera's images in its shard's stream, in the order pushed
        stream = shards[wire.shard_of(cam, SHARDS)].images
        in_stream = [wire.decode_request(raw).id for _sid, raw in iter_stream(client, stream)]
        assert [rid for rid in in_stream if rid.startswith(f"{cam}-")] == [f"{cam}-{j}" for j in range(20)]
        assert len(pushed[cam]) == 20
    assert len({wire.shard_of(cam, SHARDS) for cam in cams}) == SHARDS  # the test covers every shard
    workers = shard_workers(client, names, detector)
    assert sum(drain(w, sum(int(client.xlen(s.images)) for s in [w.consumer.names]), timeout_s=120)
               for w in workers) == 120
    ids = [f"{cam}-{j}" for cam in cams for j in range(20)]
    got = collect_verdicts(client, names, ids, shards=SHARDS, timeout_s=10)
    assert set(got) == set(ids)
    reference = detector.detect(digits.images[:20])
    for cam in cams:
        assert [got[f"{cam}-{j}"]["score"] for j in range(20)] == pytest.approx(reference.score.tolist(), abs=1e-5)
        assert {got[f"{cam}-{j}"]["stream_id"] for j in range(20)} == set(pushed[cam])
    for shard in shards:  # each verdict in its image's shard, nothing pending
        assert client.xpending(shard.images, shard.group)["pending"] == 0
        assert {wire.decode_verdict(v)["source"] for _sid, v in iter_stream(client, shard.verdicts)} == \
            {cam for cam in cams if shards[wire.shard_of(cam, SHARDS)] == shard}


def test_a_dead_consumers_shard_is_taken_over_there_and_nowhere_else(client, names, detector, digits):
    shards = names.shards(SHARDS)
    ids = [f"d-{i}" for i in range(60)]
    push_images(client, names, digits.images[:60], ids=ids, shards=SHARDS)
    # a consumer of shard 1 reads its entries and dies before answering them
    dying = StreamConsumer(client, shards[1], consumer="dies", block_ms=0)
    dying.ensure_group()
    lost = dying.read(count=1000)
    assert lost and client.xpending(shards[1].images, shards[1].group)["pending"] == len(lost)
    survivors = shard_workers(client, names, detector, consumer="lives", claim_idle_ms=0)
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in survivors]
    for t in threads:
        t.start()
    try:
        got = collect_verdicts(client, names, ids, shards=SHARDS, timeout_s=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert set(got) == set(ids)
    assert survivors[1].consumer.stats["reclaimed"] == len(lost)  # taken over by shard 1's consumer, one by one
    assert survivors[0].consumer.stats["reclaimed"] == survivors[2].consumer.stats["reclaimed"] == 0
    assert sum(int(client.xlen(s.verdicts)) for s in shards) == 60  # each answered once


def test_a_verdict_reader_follows_every_shard_from_where_it_was(client, names, detector, digits):
    before = VerdictReader(client, names, SHARDS).positions()
    push_images(client, names, digits.images[:30], ids=[f"r-{i}" for i in range(30)], shards=SHARDS)
    for w in shard_workers(client, names, detector):
        drain(w, int(client.xlen(w.consumer.names.images)), timeout_s=60)
    reader = VerdictReader(client, names, SHARDS, after=before)
    seen = []
    for _ in range(10):
        seen += [wire.decode_verdict(data)["id"] for _sid, data in reader.read(block_ms=50)]
    assert sorted(seen) == sorted(f"r-{i}" for i in range(30))
    assert reader.read(block_ms=50) == []


def test_explainer_feed_spreads_images_over_the_shards_the_worker_noted(server, client, caplog):
    """A worker serving 3 shards notes it; ``explainer feed`` (no --shards) reads it and sends each image to the
    stream of its id's shard (no camera given). A worker that notes another count says so loudly."""
    from typer.testing import CliRunner

    from worker.cli import full_app

    note_shards(client, StreamNames(), 3)
    assert served_shards(client, StreamNames()) == 3 and served_shards(client, StreamNames(), 2) == 2
    result = CliRunner().invoke(full_app(), ["feed", "--redis-url", server.url, "--n", "30"])
    assert result.exit_code == 0, result.output
    shards = StreamNames().shards(3)
    for shard in shards:
        ids = [wire.decode_request(raw).id for _sid, raw in iter_stream(client, shard.images)]
        assert ids and all(shards[wire.shard_of(rid, 3)] == shard for rid in ids)
    assert sum(int(client.xlen(s.images)) for s in shards) == 30
    assert f"explainer:images:{{{wire.shard_tag(0, 3)}}}" in result.output
    note_shards(client, StreamNames(), 2)
    assert "said 3 shards, this worker serves 2" in caplog.text
    note_shards(client, StreamNames(), 3)
