"""The query monitor against a real redis-server: a run of small edits from one source (the queries of a Square or
a decision-based attack) opens one 'probing' alert with its entries; a camera's frames, near-identical too, never
do; the state survives a worker restart, a redelivered entry never counts twice, and a source's state is bounded."""

from __future__ import annotations

import uuid

import msgpack
import numpy as np
import pytest
from streamkit import delivered

from evaluation.cameras import camera_frames
from evaluation.datasets import SHARED_DATA
from pipeline import Fingerprint, read_image_file
from worker import wire
from worker.detect import detect_requests
from worker.streams import StreamConsumer, StreamNames, StreamSettings, StreamWorker, connect, iter_stream

PHOTOS = SHARED_DATA / "nips17" / "images"


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"q-{uuid.uuid4().hex[:8]}")


def consumer(client, names, **knobs) -> StreamConsumer:
    made = StreamConsumer(client, names, consumer="w", settings=StreamSettings(**knobs))
    made.ensure_group()
    return made


def publish(cons: StreamConsumer, images: list[np.ndarray], start: int = 0, source: str = "cam-1") -> list[bool]:
    sids = delivered(cons.client, cons.names, len(images), cons.consumer)
    results = [(sid, {"v": wire.VERSION, "id": f"img-{start + i}", "model": "mnist", "is_adversarial": False,
                      "source": source}) for i, sid in enumerate(sids)]
    return cons.publish(results, {sid: Fingerprint.of(img) for sid, img in zip(sids, images, strict=True)})


def alerts(client, names) -> list[dict]:
    return [a for a in (wire.decode_alert(d) for _, d in iter_stream(client, names.episodes)) if a["kind"] == "probing"]


def square_queries(digit: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """What Square sends: stripes of ±eps, then one square of ±eps changed per query."""
    rng = np.random.default_rng(seed)
    x = np.clip(digit.astype(int) + rng.choice([-76, 76], size=(1, digit.shape[1])), 0, 255)
    out = [x.astype(np.uint8)]
    for _ in range(n - 1):
        x = x.copy()
        r, c = rng.integers(0, 24, size=2)
        x[r : r + 4, c : c + 4] = np.clip(digit[r : r + 4, c : c + 4].astype(int) + rng.choice([-76, 76]), 0, 255)
        out.append(x.astype(np.uint8))
    return out


def test_a_square_attacks_queries_open_one_probing_alert_with_its_entries(client, names, digits):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(names.alerts)
    cons = consumer(client, names)
    queries = square_queries(digits.images[0], 12)
    publish(cons, queries[:3])  # the first is new, then two edits: 2 of the last 100
    assert alerts(client, names) == []
    publish(cons, queries[3:4], start=3)
    [alert] = alerts(client, names)
    assert alert["source"] == "cam-1" and (alert["k"], alert["n"]) == (3, 100)
    assert [e["id"] for e in alert["entries"]] == ["img-3", "img-2", "img-1"]
    publish(cons, queries[4:], start=4)
    assert len(alerts(client, names)) == 1  # one alert per episode
    message = None
    for _ in range(10):
        message = pubsub.get_message(timeout=0.5)
        if message:
            break
    assert message is not None and wire.decode_alert(message["data"])["kind"] == "probing"


def test_sub_noise_edits_probe_too_and_an_exact_resend_does_not(client, names, digits):
    cons = consumer(client, names)
    base = digits.images[1]
    rng = np.random.default_rng(1)
    publish(cons, [base] * 6)  # a retried or frozen image: exact resends
    assert alerts(client, names) == []
    # every pixel of the digit's stroke moved by one grey level: dense, under the sensor noise (a binary search)
    edits = [np.clip(base.astype(int) + (base > 0) * rng.choice([-1, 1], size=base.shape), 0, 255).astype(np.uint8)
             for _ in range(3)]
    publish(cons, edits, start=6)
    assert len(alerts(client, names)) == 1


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="needs ../shared/data/nips17")
def test_a_cameras_frames_never_probe(client, names):
    """Four cameras, 60 frames each (shifts, sensor noise σ 2, JPEG): near-identical, never an edit."""
    cons = consumer(client, names, probe_k=1, probe_n=1)  # the most sensitive policy: any probe alerts
    rng = np.random.default_rng(0)
    for cam, path in enumerate(sorted(PHOTOS.iterdir())[:4]):
        scene = read_image_file(path)[:224, :224]
        for i in range(0, 60, 20):
            publish(cons, list(camera_frames(scene, 20, rng)), start=i, source=f"cam-{cam}")
    assert alerts(client, names) == []


def test_the_monitor_survives_a_worker_restart_and_a_redelivered_entry_never_counts_twice(server, client, names,
                                                                                          digits):
    queries = square_queries(digits.images[2], 4)
    publish(consumer(client, names), queries[:2])  # one edit so far
    restarted = consumer(connect(server.url), names)  # a new client, a new consumer: the history is in Redis
    [sid] = delivered(client, names, 1, restarted.consumer)
    result = [(sid, {"v": 1, "id": "img-2", "model": "mnist", "is_adversarial": False, "source": "cam-1"})]
    prints = {sid: Fingerprint.of(queries[2])}
    assert restarted.publish(result, prints) == [True]
    for _ in range(3):  # redelivered: acked, never counted again
        assert restarted.publish(result, prints) == [False]
    assert alerts(client, names) == []  # two edits, not four
    publish(restarted, queries[3:], start=3)
    [alert] = alerts(client, names)
    assert [e["id"] for e in alert["entries"]] == ["img-3", "img-2", "img-1"]


def test_a_sources_state_is_bounded(client, names):
    cons = consumer(client, names, probe_history=8)
    rng = np.random.default_rng(3)
    for _ in range(3):
        publish(cons, [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(40)])
    key = f"{names.probe_prefix}cam-1"
    assert len(msgpack.unpackb(client.hget(key, "f"), raw=True)) == 8
    assert len(msgpack.unpackb(client.hget(key, "w"))) == StreamSettings().probe_n
    # about 2.5 KB per photo's fingerprint, and a short entry per image of the window
    assert client.memory_usage(key) < 8 * 2600 + 64 * StreamSettings().probe_n
    assert 0 < client.ttl(key) <= StreamSettings().alert_idle_s


def test_through_the_worker_a_square_attack_on_digits_is_flagged_and_other_sources_are_not(client, names, digits,
                                                                                           detector):
    """The stream worker itself: a real detector, a source sending Square's queries, another sending different
    digits. Only the first opens a probing alert."""
    cons = consumer(client, names)
    queries = square_queries(digits.images[3], 6)
    for i, (img, source) in enumerate([(q, "attacker") for q in queries]
                                      + [(d, "scanner") for d in digits.images[4:10]]):
        client.xadd(names.images, {"data": wire.encode_request(f"r{i}", img, source=source)})
    worker = StreamWorker(cons, lambda reqs: detect_requests(detector, reqs))
    while worker.run_once(block_ms=50):
        pass
    [alert] = alerts(client, names)
    assert alert["source"] == "attacker"
    assert len(list(iter_stream(client, names.verdicts))) == 12


def test_the_harness_replay_alerts_where_the_stream_does(client, names, digits):
    """evaluation.query_attacks.replay_monitor (what scripts/query_monitor.py measures with) against the
    worker's script, on the same queries under the stream's default policy."""
    from evaluation.query_attacks import MonitorPolicy, replay_monitor

    st = StreamSettings()
    queries = square_queries(digits.images[5], 30, seed=5)
    publish(consumer(client, names), queries)
    [alert] = alerts(client, names)
    replayed, probes = replay_monitor(queries, MonitorPolicy(st.probe_k, st.probe_n, st.probe_history))
    assert f"img-{replayed}" == alert["entries"][0]["id"]
    assert sum(probes) >= st.probe_k
