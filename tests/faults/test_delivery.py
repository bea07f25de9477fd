"""Delivery under poison and races, with a real redis-server: a message that kills its worker process takes only
itself to the dead letters (its batch-mates get their verdicts), and one entry never gets both a verdict and a
dead letter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from faultkit import WorkerProcess, dead_letters, pending, wait_until

from pipeline import Detector, load_sample_digits
from worker import wire
from worker.feed import push_images
from worker.local_redis import LocalRedis
from worker.streams import StreamConsumer, StreamNames, connect, iter_stream

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def verdicts(client, names) -> list[dict]:
    return [wire.decode_verdict(raw) for _sid, raw in iter_stream(client, names.verdicts)]


@pytest.fixture
def poisoned_bundle(tmp_path, monkeypatch) -> Path:
    """A calibrated detector bundle around a model that SIGKILLs its process on an all-white image."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", str(FIXTURES))  # the worker processes import the factory too
    sys.modules.pop("poison_model", None)
    import poison_model

    det = Detector.from_model(poison_model.build(), input_size=28, channels=1, name="poisoned",
                              factory="poison_model:build")
    det.calibrate(load_sample_digits().images[:100], 0.05)
    return det.save(tmp_path / "poisoned")


@pytest.mark.timeout(300)
def test_a_message_that_kills_its_worker_takes_only_itself_to_the_dead_letters(tmp_path, poisoned_bundle):
    digits = load_sample_digits().parity("odd").images[:40]
    images = np.concatenate([digits[:20], np.full((1, 28, 28), 255, np.uint8), digits[20:]])
    ids = [f"m{i}" for i in range(len(images))]
    names = StreamNames.with_prefix("poison")
    with LocalRedis(tmp_path / "redis") as server:
        client = connect(server.url)
        push_images(client, names, images, ids=ids, model="poisoned")
        options = ["--detector", str(poisoned_bundle), "--trust-code", "--batch", "64", "--claim-idle-ms", "500",
                   "--max-deliveries", "2", "--block-ms", "100"]
        died = 0
        for attempt in range(5):  # a new worker each time the last one died, as an orchestrator restarts it
            worker = WorkerProcess(server.url, "poison", f"w{attempt}", tmp_path, extra=options).wait_ready()
            done = wait_until(lambda w=worker: len(verdicts(client, names)) + len(dead_letters(client, names))
                              == len(ids) or not w.alive(), timeout_s=120)
            assert done, worker.log_tail()
            if worker.alive():
                assert worker.term() == 0
                break
            died += 1
        got = {v["id"]: v for v in verdicts(client, names)}
        dead = dead_letters(client, names)
        assert died >= 1  # the poison did kill workers
        assert sorted(got) == sorted(i for i in ids if i != "m20"), f"dead: {[d['reason'] for d in dead.values()]}"
        assert len(dead) == 1 and next(iter(dead.values()))["kind"] == "max_deliveries"
        assert len(verdicts(client, names)) == len(ids) - 1  # no verdict twice
        assert pending(client, names) == 0


def test_one_entry_never_gets_both_a_verdict_and_a_dead_letter(tmp_path):
    names = StreamNames.with_prefix("race")
    with LocalRedis(tmp_path / "redis") as server:
        client = connect(server.url)
        slow, fast = (StreamConsumer(connect(server.url), names, consumer=c, claim_idle_ms=0, block_ms=100)
                      for c in ("slow", "fast"))
        slow.ensure_group()
        push_images(client, names, load_sample_digits().images[:2], ids=["a", "b"])
        (sid_a, _), (sid_b, _) = slow.read()
        verdict = {"v": wire.VERSION, "id": "a", "is_adversarial": False}
        # a: another consumer dead-letters it first, then the slow one publishes its verdict
        assert fast.dead_letter(sid_a, b"", "gave up", kind="max_deliveries") is not None
        assert slow.publish([(sid_a, verdict)]) == [False]
        # b: the slow one publishes first, then another consumer would dead-letter it
        assert slow.publish([(sid_b, {**verdict, "id": "b"})]) == [True]
        assert fast.dead_letter(sid_b, b"", "gave up", kind="max_deliveries") is None
        assert [v["id"] for v in verdicts(client, names)] == ["b"]
        assert list(dead_letters(client, names)) == [sid_a]
        assert pending(client, names) == 0


@pytest.mark.timeout(300)
def test_what_docs_wire_md_promises_is_what_a_lost_aof_second_and_a_capped_stream_do(tmp_path):
    """docs/wire.md promises at-least-once with every repeat naming the same image stream entry, and says the
    verdict stream's cap trims by length whatever a consumer group has read. Both, measured."""
    import reliability_delivery as rd

    docs = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()
    assert "exactly-once" not in docs and "At least once" in docs
    assert "whether or not anyone has read them" in docs

    cut = rd.aof_last_second(tmp_path / "aof", n=400, log=lambda m: None)
    assert cut.lost == 0 and cut.verdicts == 400 and cut.pending_after == 0
    assert cut.extra["unflagged_duplicates"] == 0  # every repeat names the entry it repeats
    assert cut.dup_stream <= cut.extra["written_in_lost_second"]

    capped = rd.verdict_overrun(tmp_path / "overrun", n=600, maxlen=200, log=lambda m: None)
    assert capped.verdicts == 600 and capped.lost == 0  # a live reader saw them all
    assert 200 <= capped.extra["late_reader_got"] < 400  # the late group only what the cap kept
