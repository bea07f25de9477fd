"""Per-source alert windows against a real redis-server: k flagged of the last n images of one source open one
episode (one alert, with the entries that caused it), the state survives a worker restart, a redelivered entry
never counts twice, and a source's state is bounded and forgotten when it goes quiet."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from streamkit import delivered

from pipeline import load_adversarial_digits, load_sample_digits
from worker import wire
from worker.detect import detect_requests, load_served_detectors
from worker.feed import push_images
from worker.streams import StreamConsumer, StreamNames, StreamSettings, StreamWorker, connect, iter_stream

WINDOW = {"alert_k": 3, "alert_n": 5}


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"w-{uuid.uuid4().hex[:8]}")


def verdict(i: int, flagged: bool, source: str | None = "cam-1") -> dict:
    return {"v": wire.VERSION, "id": f"img-{i}", "model": "mnist", "is_adversarial": flagged,
            **({"source": source} if source else {})}


def entries(client: redis.Redis, names: StreamNames, n: int) -> list[str]:
    return delivered(client, names, n)


def publish(consumer: StreamConsumer, sids: list[str], flags: list[bool], start: int = 0, source="cam-1") -> None:
    consumer.publish([(sid, verdict(start + i, f, source)) for i, (sid, f) in enumerate(zip(sids, flags, strict=True))])


def episodes(client: redis.Redis, names: StreamNames) -> list[dict]:
    return [wire.decode_alert(data) for _, data in iter_stream(client, names.episodes)]


def consumer(client, names, **knobs) -> StreamConsumer:
    made = StreamConsumer(client, names, consumer="w", settings=StreamSettings(**{**WINDOW, **knobs}))
    made.ensure_group()
    return made


def test_k_of_the_last_n_opens_one_episode_with_its_entries_and_it_closes_when_the_window_is_clean(client, names):
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(names.alerts)
    cons = consumer(client, names)
    sids = entries(client, names, 14)
    # flagged, clean, flagged: 2 of the last 5, no alert; a third flagged opens the episode
    publish(cons, sids[:3], [True, False, True])
    assert episodes(client, names) == []
    publish(cons, sids[3:4], [True], start=3)
    [episode] = episodes(client, names)
    assert episode["kind"] == "episode" and episode["source"] == "cam-1" and (episode["k"], episode["n"]) == (3, 5)
    assert [e["id"] for e in episode["entries"]] == ["img-3", "img-2", "img-0"]
    assert [e["stream_id"] for e in episode["entries"]] == [sids[3], sids[2], sids[0]]
    # more flagged images in the same episode raise no second alert; five clean ones close it
    publish(cons, sids[4:6], [True, True], start=4)
    publish(cons, sids[6:11], [False] * 5, start=6)
    assert len(episodes(client, names)) == 1
    publish(cons, sids[11:14], [True] * 3, start=11)  # a new episode
    assert len(episodes(client, names)) == 2 and cons.stats["episodes"] == 2
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message:
            got.append(wire.decode_alert(message["data"]))
    assert [a["kind"] for a in got] == ["episode", "episode"]  # no per-image alerts under the window policy
    assert len(list(iter_stream(client, names.verdicts))) == 14  # every verdict still written


def test_sources_are_counted_apart_and_images_without_one_never_open_an_episode(client, names):
    cons = consumer(client, names)
    sids = entries(client, names, 8)
    publish(cons, sids[0:2], [True, True], source="cam-a")
    publish(cons, sids[2:4], [True, True], start=2, source="cam-b")
    publish(cons, sids[4:8], [True] * 4, start=4, source=None)
    assert episodes(client, names) == []


def test_the_window_survives_a_worker_restart_mid_episode(server, client, names):
    """Two flagged images, the worker goes away, a new one (another process's consumer) sees the third: one
    episode with all three, because the state lives in Redis, not in the worker."""
    sids = entries(client, names, 3)
    publish(consumer(client, names), sids[:2], [True, True])
    publish(consumer(connect(server.url), names), sids[2:], [True], start=2)  # a new client, a new consumer
    [episode] = episodes(client, names)
    assert [e["id"] for e in episode["entries"]] == ["img-2", "img-1", "img-0"]


def test_a_redelivered_entry_never_counts_twice(client, names):
    cons = consumer(client, names)
    sids = entries(client, names, 2)
    publish(cons, sids[:1], [True])
    for _ in range(3):  # the same entry published again (a slow consumer's duplicate): acked, not counted
        assert cons.publish([(sids[0], verdict(0, True))]) == [False]
    publish(cons, sids[1:], [True], start=1)
    assert episodes(client, names) == []  # 2 flagged images, not 4


def test_a_sources_state_is_bounded_and_forgotten_when_it_goes_quiet(client, names):
    cons = consumer(client, names, alert_idle_s=1)
    sids = entries(client, names, 40)
    publish(cons, sids, [False] * 40)
    key = f"{names.window_prefix}cam-1"
    assert len(__import__("msgpack").unpackb(client.hget(key, "w"))) == WINDOW["alert_n"]
    assert client.memory_usage(key) < 1024
    assert 0 < client.ttl(key) <= 1
    time.sleep(1.5)
    assert not client.exists(key)


def test_the_policy_is_checked_as_one_setting():
    for bad in ({"alert_k": 3}, {"alert_n": 5}, {"alert_k": 6, "alert_n": 5}, {"alert_k": 1, "alert_n": 1000}):
        with pytest.raises(ValueError, match="alert_k and alert_n"):
            StreamSettings(**bad)
    assert StreamSettings(alert_k=1, alert_n=1).windowed and not StreamSettings().windowed


def test_a_worker_with_the_window_policy_alerts_once_for_a_camera_that_sends_adversarials(client, names):
    """The whole path: digits from two cameras through a standalone-style worker with the real detector; the
    camera that sends shipped adversarials opens one episode, the clean camera none."""
    detectors = load_served_detectors([{"model": "mnist", "fpr": 0.01}])
    cons = consumer(client, names, batch=16, block_ms=50)
    worker = StreamWorker(cons, lambda reqs: detect_requests(detectors, reqs))
    clean = load_sample_digits().parity("odd").images[:12]
    adversarial = load_adversarial_digits().images[:12]
    push_images(client, names, clean, ids=[f"clean-{i}" for i in range(12)], source="lobby")
    push_images(client, names, adversarial, ids=[f"adv-{i}" for i in range(12)], source="gate")
    while worker.run_once(block_ms=50):
        pass
    verdicts = [wire.decode_verdict(data) for _, data in iter_stream(client, names.verdicts)]
    assert {v["source"] for v in verdicts} == {"lobby", "gate"} and len(verdicts) == 24
    [episode] = episodes(client, names)
    assert episode["source"] == "gate" and len(episode["entries"]) == 3
    assert all(e["id"].startswith("adv-") for e in episode["entries"])


def test_explainer_serve_refuses_a_window_that_cannot_fill_before_starting_anything():
    from typer.testing import CliRunner

    from worker.cli import app

    for bad in ("5/3", "0/4", "three/10", "3"):
        done = CliRunner().invoke(app, ["serve", "--alert-window", bad, "--redis-url", "redis://127.0.0.1:1/0"])
        assert done.exit_code == 2 and "--alert-window" in done.output, (bad, done.output)


def test_a_verdict_without_a_decision_leaves_the_window_as_it_was(client, names):
    """A failing model (error verdicts, no decision) must not close an open episode nor re-arm the alert."""
    cons = consumer(client, names)
    sids = entries(client, names, 10)
    publish(cons, sids[:3], [True, True, True])
    assert len(episodes(client, names)) == 1
    cons.publish([(sid, {**verdict(3 + i, False), "is_adversarial": None, "error": "model failed"})
                  for i, sid in enumerate(sids[3:8])])
    assert client.hget(f"{names.window_prefix}cam-1", "open") is not None  # still open
    publish(cons, sids[8:10], [True, True], start=8)
    assert len(episodes(client, names)) == 1  # the same episode, not a second alert
