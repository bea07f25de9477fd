"""A producer far faster than the worker; the trimming policy never drops unread entries."""

from __future__ import annotations

import pytest
import reliability


@pytest.mark.timeout(300)
def test_fast_producer_keeps_worker_memory_flat_and_loses_nothing(tmp_path, nothing_lost):
    fig = reliability.backpressure(tmp_path, n=3000, pad_kib=64)
    nothing_lost(fig)
    x = fig.extra
    assert x["max_stream_len"] >= 500, x  # the producer outran the worker: a real backlog built up (in Redis) ...
    assert x["backlog_mib"] >= 150, x
    assert x["rss_growth_mib"] < 0.5 * x["backlog_mib"], x  # ... and not in the worker
    assert x["stream_len_after"] <= 300, x  # acked entries were trimmed once read
    assert x["trimmed_by_worker"] >= 1000, x


def test_backlog_cap_refuses_the_producer_and_trimming_keeps_unread_entries(tmp_path):
    fig = reliability.backlog_full(tmp_path, max_backlog=500)
    x = fig.extra
    assert x["refused"] and "backpressure" in x["message"], x
    assert 500 <= x["pushed"] == fig.sent < 600, x  # stopped at the cap (plus one pipeline chunk at most)
    assert x["trimmed"] == 0 and x["stream_len_after_trim"] == fig.sent and fig.lost == 0, x


def test_trimming_waits_for_the_slowest_consumer_group(tmp_path):
    """Two groups read the image stream; trimming follows the one behind, and only removes acked entries."""
    from worker.local_redis import LocalRedis
    from worker.streams import StreamConsumer, StreamNames, connect

    with LocalRedis(tmp_path / "redis") as server:
        client = connect(server.url)
        fast, slow = StreamNames(group="fast"), StreamNames(group="slow")
        ids = [client.xadd(fast.images, {"data": b"x" * 100}).decode() for _ in range(3000)]
        a, b = (StreamConsumer(client, n, consumer="c", batch=1000, block_ms=10) for n in (fast, slow))
        a.ensure_group(), b.ensure_group()
        for _ in range(3):  # "fast" reads and acks everything
            client.xack(fast.images, "fast", *[sid for sid, _ in a.read()])
        assert a.trim_acked() == 0  # "slow" has read nothing: nothing may go
        taken = b.read()  # "slow" reads 1000 and acks only the first 500
        client.xack(fast.images, "slow", *[sid for sid, _ in taken[:500]])
        removed = b.trim_acked()
        remaining = [e[0].decode() for e in client.xrange(fast.images)]
        assert 0 < removed <= 500 and remaining == ids[removed:]  # a prefix of acked entries, nothing else
        assert set(ids[500:]) <= set(remaining)  # pending (500-999) and unread (1000-2999) all kept
        client.close()


@pytest.mark.timeout(300)
def test_a_full_redis_keeps_the_computed_verdicts_and_recovers_without_loss(tmp_path):
    """Redis at maxmemory with noeviction refuses the verdict writes: the worker keeps the batch it computed,
    reads nothing more (the pending list stays one batch), says why in ``degraded``, and once memory is freed
    publishes everything, once."""
    import threading
    import time

    from faultkit import pending, wait_until

    from pipeline import Detector, load_sample_digits
    from worker import wire
    from worker.detect import detect_requests
    from worker.feed import push_images
    from worker.local_redis import LocalRedis
    from worker.streams import StreamConsumer, StreamNames, StreamWorker, connect, iter_stream

    names = StreamNames.with_prefix("oom")
    detector = Detector.from_pretrained("mnist")
    with LocalRedis(tmp_path / "redis", extra_config={"maxmemory-policy": "noeviction"}) as server:
        client = connect(server.url)
        images = load_sample_digits().images[:300]
        push_images(client, names, images, ids=[f"o{i}" for i in range(len(images))])
        consumer = StreamConsumer(connect(server.url), names, consumer="w", batch=32, block_ms=100)
        consumer.ensure_group()
        worker = StreamWorker(consumer, lambda reqs: detect_requests(detector, reqs), max_backoff_s=0.5)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 64 * 1024)  # a little room, not enough for many verdicts
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        assert wait_until(lambda: worker.degraded is not None, timeout_s=60)
        time.sleep(3)  # a while at maxmemory
        assert "out of memory" in worker.degraded and worker.unpublished > 0
        assert pending(client, names) <= 2 * consumer.settings.batch, "the worker kept reading while Redis was full"
        client.config_set("maxmemory", 0)
        assert wait_until(lambda: len(list(iter_stream(client, names.verdicts))) >= len(images), timeout_s=120)
        stop.set()
        thread.join(30)
        got = [wire.decode_verdict(raw)["id"] for _sid, raw in iter_stream(client, names.verdicts)]
        assert sorted(got) == sorted(f"o{i}" for i in range(len(images)))  # every one, once
        assert pending(client, names) == 0 and worker.degraded is None and worker.unpublished == 0
