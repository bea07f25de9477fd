"""The streaming product end to end: a real redis-server, a real Ray Serve application, real digits.

One Ray + Serve start-up is shared by the whole module (it takes most of a minute on 2 cores).
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from pipeline import Detector, ImageTooLargeError, InputError, load_adversarial_digits
from worker import wire
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack, load_config
from worker.feed import push_images
from worker.local_redis import free_port
from worker.streams import StreamConsumer, StreamNames, connect, iter_stream


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    overrides = {"claim_idle_ms": 1500, "block_ms": 100}
    # merged Captum calls of at most 64 images while the consumers read up to 256: every full read is split by
    # Explainer.explain_any, so the verdict-equality test below covers that path too
    small_batches = {"Explainer": {"user_config": {"max_batch_size": 64, "batch_wait_timeout_s": 0.005}}}
    with embedded_stack(data_dir=tmp_path_factory.mktemp("stack"), http_port=free_port(),
                        overrides=overrides, deployment_overrides=small_batches) as st:
        yield st


@pytest.fixture(scope="module")
def client(stack):
    return connect(stack.redis_url)


NAMES = StreamNames()


def test_200_messages_give_200_verdicts_equal_to_in_process(stack, client, digits):
    clean = digits.parity("odd").head(150)
    adv = load_adversarial_digits().head(50)
    images = np.concatenate([clean.images, adv.images])
    ids = [f"e2e-{i}" for i in range(len(images))]
    after = last_id(client, NAMES.verdicts)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(NAMES.alerts)
    push_images(client, NAMES, images, ids=ids)
    got = collect_verdicts(client, NAMES, ids, after, timeout_s=180)
    assert len(got) == 200
    assert int(client.xpending(NAMES.images, NAMES.group)["pending"]) == 0

    reference = Detector.from_pretrained("mnist")
    expected, expected_method = reference.detect(images), reference.config.method
    streamed = [got[i] for i in ids]
    assert [v["predicted_class"] for v in streamed] == expected.predicted_class.tolist()
    assert [v["is_adversarial"] for v in streamed] == expected.is_adversarial.tolist()
    assert np.allclose([v["score"] for v in streamed], expected.score, rtol=1e-4, atol=1e-4)
    # the verdict carries every input of the score: here the median check's shift beside the top-level fields
    assert np.allclose([v["signals"]["median_shift"] for v in streamed], expected.signals["median_shift"], rtol=1e-4,
                       atol=1e-5)
    for name in ("denoise_residual", "impulse_residual"):
        assert np.allclose([v["signals"][name] for v in streamed], expected.signals[name], rtol=1e-4, atol=1e-5)
    assert all(set(v["signals"]) == {"median_shift", "denoise_residual", "impulse_residual"} for v in streamed)
    assert all(v["latency_ms"] >= 0 and v["method"] == expected_method for v in streamed)

    alerts = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # get_message gives None for the subscribe confirmation too: keep going
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            alerts.append(wire.decode_verdict(message["data"]))
        elif len(alerts) >= len([i for i in ids if got[i]["is_adversarial"]]):
            break
    pubsub.close()
    flagged = {i for i in ids if got[i]["is_adversarial"]}
    assert flagged, "some adversarial digits must be flagged"
    assert {a["id"] for a in alerts if a["id"].startswith("e2e-")} == flagged


def test_each_stage_counts_its_own_work(stack, client, digits):
    """StageStats: what a profile reads to tell a busy stage from a waiting one."""
    from ray import serve

    def stats():
        return {name: serve.get_deployment_handle(name, app_name="explainer").stats.remote().result(timeout_s=30)
                for name in ("Denoiser", "Explainer", "Scorer")}

    before = stats()
    images = digits.parity("odd").head(40).images
    ids = [f"stats-{i}" for i in range(len(images))]
    after_id = last_id(client, NAMES.verdicts)
    push_images(client, NAMES, images, ids=ids)
    assert len(collect_verdicts(client, NAMES, ids, after_id, timeout_s=120)) == len(images)
    after = stats()
    for name in before:
        assert after[name]["images"] - before[name]["images"] == len(images), name
        assert after[name]["calls"] > before[name]["calls"]
        assert after[name]["busy_s"] > before[name]["busy_s"] and after[name]["cpu_s"] >= before[name]["cpu_s"]


def test_poison_messages_go_to_the_dead_letters_and_others_get_verdicts(stack, client, digits):
    dead_before = client.xlen(NAMES.dead)
    after = last_id(client, NAMES.verdicts)
    good_ids = [f"poison-ok-{i}" for i in range(10)]
    client.xadd(NAMES.images, {"data": b"\x93not msgpack at all"})
    push_images(client, NAMES, digits.images[:10], ids=good_ids)
    client.xadd(NAMES.images, {"data": wire.encode_request("poison-v2", digits.images[0])[:-5]})
    got = collect_verdicts(client, NAMES, good_ids, after, timeout_s=60)
    assert len(got) == 10
    dead = [wire.decode_dead_letter(d) for _, d in iter_stream(client, NAMES.dead)][dead_before:]
    assert len(dead) == 2 and all(d["reason"] for d in dead)
    assert int(client.xpending(NAMES.images, NAMES.group)["pending"]) == 0


def _scrape(url: str) -> dict[str, float]:
    """Prometheus text: the sum of each metric name's samples with the given labels, e.g.
    ``ray_explainer_verdicts_total{outcome="clean"}``, as {name{label="value"}: total}."""
    totals: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if not line.startswith("ray_explainer_"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        for key in [name, *(f'{name}{{{k}="{v}"}}' for k, v in pairs.items() if k in ("outcome", "kind", "le"))]:
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def test_the_stream_metrics_reach_rays_prometheus_endpoint_and_move(stack, client, digits):
    """Verdicts by outcome, alerts, dead letters by kind, latency and the backlog gauges, scraped from the
    endpoint `explainer serve` exposes; the earlier tests of this module published verdicts and dead letters."""
    assert stack.metrics_url
    deadline, seen = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        seen = _scrape(stack.metrics_url)
        dead = seen.get('ray_explainer_dead_letters_total{kind="undecodable"}', 0)
        if dead >= 2 and "ray_explainer_stream_pending" in seen:
            break
        time.sleep(2)
    assert seen.get('ray_explainer_verdicts_total{outcome="clean"}', 0) >= 100, seen
    assert seen.get('ray_explainer_verdicts_total{outcome="adversarial"}', 0) >= 50, seen
    assert seen.get("ray_explainer_alerts_total", 0) == seen['ray_explainer_verdicts_total{outcome="adversarial"}']
    assert seen.get('ray_explainer_dead_letters_total{kind="undecodable"}', 0) >= 2, seen
    assert seen.get("ray_explainer_latency_ms_count", 0) == seen["ray_explainer_verdicts_total"], seen
    before = seen["ray_explainer_verdicts_total"]
    after = last_id(client, NAMES.verdicts)
    ids = [f"metrics-{i}" for i in range(20)]
    push_images(client, NAMES, digits.images[:20], ids=ids)
    assert len(collect_verdicts(client, NAMES, ids, after, timeout_s=60)) == 20
    until = time.monotonic() + 60
    while time.monotonic() < until and _scrape(stack.metrics_url)["ray_explainer_verdicts_total"] < before + 20:
        time.sleep(2)
    assert _scrape(stack.metrics_url)["ray_explainer_verdicts_total"] >= before + 20


def test_entries_of_a_consumer_that_died_mid_batch_are_reclaimed(stack, client, digits):
    """A consumer reads a batch and dies before acking: the Serve consumers reclaim it (XAUTOCLAIM)."""
    ids = [f"orphan-{i}" for i in range(20)]
    after = last_id(client, NAMES.verdicts)
    client.xgroup_createconsumer(NAMES.images, NAMES.group, "doomed")
    # park the entries in the doomed consumer's pending list in one atomic step
    pipe = client.pipeline(transaction=True)
    for i, image in zip(ids, digits.images[20:40], strict=True):
        pipe.xadd(NAMES.images, {"data": wire.encode_request(i, image)})
    pipe.xreadgroup(NAMES.group, "doomed", {NAMES.images: ">"}, count=1000)
    taken = pipe.execute()[-1]
    doomed_ids = {wire.decode_request(f[b"data"]).id for _, entries in taken for _, f in entries}
    assert set(ids) <= doomed_ids
    got = collect_verdicts(client, NAMES, ids, after, timeout_s=60)
    assert len(got) == 20
    pending = client.xpending_range(NAMES.images, NAMES.group, "-", "+", 100, consumername="doomed")
    assert pending == []
    assert StreamConsumer(client, NAMES).pending_count() == 0


def _post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_route_answers(stack, digits):
    ok, png = cv2.imencode(".png", digits.images[3])
    status, verdict = _post(stack.http_url + "/detect", png.tobytes())
    assert status == 200
    expected = Detector.from_pretrained("mnist").detect(digits.images[3])
    assert verdict["predicted_class"] == int(expected.predicted_class[0])
    assert verdict["is_adversarial"] == bool(expected.is_adversarial[0])

    status, body = _post(stack.http_url + "/detect", b"this is not an image", "text/plain")
    assert status == 415 and "decodable" in body["detail"]
    status, body = _post(stack.http_url + "/detect", cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes())
    assert status == 422 and "wrong image size" in body["detail"]
    # an over-size body is refused from its declared length, before the server reads it
    host, port = stack.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/detect")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and b"exceeds the limit" in response.read()
    conn.close()
    with urllib.request.urlopen(stack.http_url + "/healthz", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["consumers_alive"] == load_config()["args"]["consumers"]


def test_ingress_health_check_fails_when_a_consumer_thread_died():
    """A dead consumer thread must fail Serve's health check (so the replica is replaced), but not a stop."""
    import threading

    from worker.serve_app import Ingress
    from worker.streams import StreamWorker

    ingress = Ingress.func_or_class.__new__(Ingress.func_or_class)  # the class itself, no replica needed
    finished = threading.Thread(target=lambda: None, name="consumer-0")
    finished.start()
    finished.join()
    worker = StreamWorker(StreamConsumer(connect("redis://127.0.0.1:1/0"), NAMES), lambda reqs: [])
    ingress.threads, ingress.workers, ingress.stop, ingress.stall_s = [finished], [worker], threading.Event(), 60.0
    with pytest.raises(RuntimeError, match="consumer-0"):
        ingress.check_health()
    ingress.stop.set()  # drained on purpose: healthy
    ingress.check_health()


def test_ingress_health_check_fails_when_a_consumer_is_stuck_in_one_batch():
    """A consumer alive but stuck (a stage call that never returns) fails the health check too, once its batch
    has run for longer than a stage call may take; /healthz lists why."""
    import threading
    import time

    from worker.serve_app import Ingress
    from worker.streams import StreamWorker

    release = threading.Event()
    worker = StreamWorker(StreamConsumer(connect("redis://127.0.0.1:1/0"), NAMES), lambda reqs: [])
    stuck = threading.Thread(target=release.wait, name="consumer-0", daemon=True)
    stuck.start()
    ingress = Ingress.func_or_class.__new__(Ingress.func_or_class)
    ingress.threads, ingress.workers, ingress.stop, ingress.stall_s = [stuck], [worker], threading.Event(), 0.2
    ingress.check_health()
    worker._busy_since = time.monotonic()  # what run_once sets while detect_fn runs
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="stalled.*consumer-0"):
        ingress.check_health()
    assert any("stalled" in p for p in ingress._problems())
    release.set()


def test_image_files_from_outside_are_bounded_from_their_header_and_otherwise_accepted(digits):
    """What the HTTP route decodes (its decoder alone, no stack): photos of any size up to 4096² pixels, 16-bit
    files reduced to their high 8 bits as libpng strips them, bytes after the image's end (a phone's motion-photo
    trailer); refused from the header: other formats, and what is over the pixel limit (ImageTooLargeError,
    which the route answers 413)."""
    from worker.serve_app import decode_body

    digit = digits.images[0]
    png = cv2.imencode(".png", digit)[1].tobytes()
    np.testing.assert_array_equal(decode_body(png), digit)
    np.testing.assert_array_equal(decode_body(png + b"\n"), digit)
    rgb = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_body(cv2.imencode(".png", rgb[:, :, ::-1])[1].tobytes()), rgb)
    deep = np.random.default_rng(2).integers(0, 65536, (6, 5), dtype=np.uint16)
    np.testing.assert_array_equal(decode_body(cv2.imencode(".png", deep)[1].tobytes()), deep >> 8)
    photo = cv2.imencode(".jpg", np.zeros((3024, 4032, 3), np.uint8))[1].tobytes()  # a 12 MP phone photo
    assert decode_body(photo).shape == (3024, 4032, 3)
    for data, error, message in [
        (b"", InputError, "empty"), (b"II*\x00" + b"\x00" * 40, InputError, "not a decodable PNG/JPEG"),
        (cv2.imencode(".png", np.zeros((4097, 4096), np.uint8))[1].tobytes(), ImageTooLargeError, "too large"),
    ]:
        with pytest.raises(error, match=message):
            decode_body(data)
