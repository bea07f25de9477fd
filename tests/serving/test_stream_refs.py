"""Images by reference through the stream: a real loopback HTTP server holds PNG digits, requests carry their URL,
size and SHA-256, and the worker fetches them (worker.refs) beside inline ones. The verdicts equal the in-process
ones; refused references reach the dead letters with the reason, at once; an unreachable server leaves its entry
pending until it answers."""

from __future__ import annotations

import hashlib
import threading
import uuid

import cv2
import msgpack
import pytest
from streamkit import Files

from worker import wire
from worker.collect import collect_verdicts
from worker.detect import detect_requests
from worker.feed import push_images, push_requests
from worker.local_redis import free_port
from worker.refs import RefFetcher, RefUnavailable
from worker.streams import StreamConsumer, StreamEvents, StreamNames, StreamWorker, drain, iter_stream


def png(image) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def ref_of(url: str, data: bytes) -> wire.Ref:
    return wire.Ref(url, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture
def names() -> StreamNames:
    return StreamNames.with_prefix(f"ref-{uuid.uuid4().hex[:8]}")


def worker_for(client, names, detector, allow, **knobs) -> StreamWorker:
    consumer = StreamConsumer(client, names, consumer="w", block_ms=20, **knobs)
    consumer.ensure_group()
    return StreamWorker(consumer, lambda reqs: detect_requests(detector, reqs),
                        fetcher=RefFetcher(allow, timeout_s=2.0))


def test_referenced_digits_get_the_in_process_verdicts_and_bad_references_a_reason(client, names, detector, digits):
    images = digits.images[:40]
    files = {f"d{i}.png": png(im) for i, im in enumerate(images)}
    server = Files(files)
    reqs = [(f"r{i}", wire.encode_ref_request(f"r{i}", ref_of(f"{server.url}/d{i}.png", files[f"d{i}.png"]),
                                              encoding="png")) for i in range(40)]
    bad = {
        "missing": ref_of(f"{server.url}/nowhere.png", files["d0.png"]),
        "digest": wire.Ref(f"{server.url}/d1.png", len(files["d1.png"]), "0" * 64),
        "size": wire.Ref(f"{server.url}/d2.png", len(files["d2.png"]) - 1, hashlib.sha256(files["d2.png"]).hexdigest()),
        "host": ref_of(f"http://localhost:{server.server_address[1]}/d3.png", files["d3.png"]),
        "file": ref_of("file:///etc/passwd", b"x"),
    }
    reqs += [(k, wire.encode_ref_request(k, ref, encoding="png")) for k, ref in bad.items()]
    push_requests(client, names, reqs)
    push_images(client, names, images[:10], ids=[f"inline{i}" for i in range(10)])
    worker = worker_for(client, names, detector, [server.url])
    assert drain(worker, 55, timeout_s=120) == 55
    got = collect_verdicts(client, names, [f"r{i}" for i in range(40)] + [f"inline{i}" for i in range(10)],
                           timeout_s=10)
    reference = detector.detect(images)
    assert [got[f"r{i}"]["score"] for i in range(40)] == pytest.approx(reference.score.tolist(), abs=1e-5)
    assert [got[f"inline{i}"]["score"] for i in range(10)] == pytest.approx(reference.score[:10].tolist(), abs=1e-5)
    dead = {wire.decode_request(d["payload"]).id: d for d in
            (wire.decode_dead_letter(raw) for _sid, raw in iter_stream(client, names.dead))}
    assert set(dead) == set(bad) and {d["kind"] for d in dead.values()} == {"ref"}
    for key, cause in {"missing": "404", "digest": "sha256", "size": "size", "host": "not in ref_allow",
                       "file": "not in ref_allow"}.items():
        assert cause in dead[key]["reason"].lower(), (key, dead[key]["reason"])
    assert client.xpending(names.images, names.group)["pending"] == 0


def test_a_deployment_that_allows_nothing_dead_letters_every_reference_saying_how_to_allow_it(
        client, names, detector, digits):
    data = png(digits.images[0])
    push_requests(client, names, [("a", wire.encode_ref_request("a", ref_of("http://127.0.0.1:9/a.png", data),
                                                                encoding="png"))])
    consumer = StreamConsumer(client, names, consumer="w", block_ms=20)
    consumer.ensure_group()
    worker = StreamWorker(consumer, lambda reqs: detect_requests(detector, reqs))  # the default fetcher
    assert drain(worker, 1, timeout_s=30) == 1
    [(_sid, raw)] = list(iter_stream(client, names.dead))
    assert "ref_allow" in wire.decode_dead_letter(raw)["reason"]


def test_an_unreachable_server_leaves_the_entry_pending_until_it_answers(client, names, detector, digits):
    """A refused connection is no reason to dead-letter an image: it stays pending, the worker backs off instead of
    spinning on it, and answers it once the server is up (after the origin's cooldown and the claim idle time)."""
    port = free_port()
    data = png(digits.images[0])
    push_requests(client, names, [("late", wire.encode_ref_request(
        "late", ref_of(f"http://127.0.0.1:{port}/late.png", data), encoding="png"))])
    class Unfetched(StreamEvents):
        count = 0

        def fetch_failed(self, count: int) -> None:
            Unfetched.count += count

    worker = worker_for(client, names, detector, [f"http://127.0.0.1:{port}"], claim_idle_ms=500, events=Unfetched())
    with pytest.raises(RefUnavailable):  # nothing else in the batch: run() backs off on it
        worker.run_once(block_ms=50)
    assert Unfetched.count == 1  # the metric the Ingress exports (explainer_ref_fetch_failures)
    assert client.xpending(names.images, names.group)["pending"] == 1
    assert client.xlen(names.dead) == 0
    server = Files({"late.png": data}, port=port)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    try:
        got = collect_verdicts(client, names, ["late"], timeout_s=30)  # reclaimed, fetched, answered
    finally:
        stop.set()
        runner.join(timeout=30)
        server.shutdown()
    assert got["late"]["score"] == pytest.approx(float(detector.detect(digits.images[:1]).score[0]), abs=1e-5)
    assert client.xlen(names.dead) == 0


def test_a_fetched_file_decodes_under_the_inline_rules_raw_pixels_included(client, names, detector, digits):
    """Raw pixels by reference (with their shape) get the inline verdict; a fetched file that is not what its
    encoding says goes to the dead letters as undecodable, like an inline one, and raw pixels whose declared size
    does not fit their shape are refused before any fetch."""
    raw = digits.images[0].tobytes()
    pngs = png(digits.images[1])
    server = Files({"raw.bin": raw, "digit.png": pngs})
    push_requests(client, names, [
        ("raw", wire.encode_ref_request("raw", ref_of(f"{server.url}/raw.bin", raw), encoding="raw", shape=(28, 28))),
        ("wrong", wire.encode_ref_request("wrong", ref_of(f"{server.url}/digit.png", pngs), encoding="jpeg")),
        ("short", wire.encode_ref_request("short", ref_of(f"{server.url}/raw.bin", raw), encoding="raw",
                                          shape=(28, 29))),
    ])
    worker = worker_for(client, names, detector, [server.url])
    try:
        assert drain(worker, 3, timeout_s=30) == 3
    finally:
        server.shutdown()
    got = collect_verdicts(client, names, ["raw"], timeout_s=5)
    assert got["raw"]["score"] == pytest.approx(float(detector.detect(digits.images[:1]).score[0]), abs=1e-5)
    dead = {msgpack.unpackb(d["payload"])["id"]: d for d in
            (wire.decode_dead_letter(raw) for _sid, raw in iter_stream(client, names.dead))}
    assert {k: d["kind"] for k, d in dead.items()} == {"wrong": "undecodable", "short": "undecodable"}
    assert "not a JPEG" in dead["wrong"]["reason"] and "needs 812 bytes" in dead["short"]["reason"]
