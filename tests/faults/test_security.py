"""AUTH and TLS end to end, weights_only loading, msgpack limits. (The HTTP route's body limit
and 4xx for non-images: tests/test_serve.py::test_http_route_answers, and test_serve_faults.py here.)"""

from __future__ import annotations

import ast
import shutil
import tracemalloc
from pathlib import Path

import pytest
import redis
import reliability
import torch

from worker import wire
from worker.streams import connect

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make the test certificates")
@pytest.mark.timeout(240)
def test_worker_over_tls_with_auth_and_refusals(tmp_path, nothing_lost):
    fig = reliability.tls_and_auth(tmp_path, n=100)
    nothing_lost(fig)
    assert fig.extra["worker_used_tls"] and fig.extra["tls_handshakes"] >= 1
    refused = fig.extra["refused"]
    assert all(refused.values()), refused  # every misconfigured client was refused
    assert "certificate verify failed" in refused["rediss:// without the CA"]
    assert "Authentication" in refused["redis:// wrong password"]
    assert fig.extra["wrong_password_worker_exit"] == 2
    assert "authentication failed" in fig.extra["wrong_password_worker_said"][0]["error"]


def test_rediss_url_and_its_options_reach_redis_py():
    client = connect("rediss://:p%40ss@example.invalid:6390/3?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    pool = client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    kw = pool.connection_kwargs
    assert (kw["password"], kw["port"], kw["db"], kw["ssl_ca_certs"]) == ("p@ss", 6390, 3, "/etc/ca.pem")


def _torch_load_calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                yield node


def test_every_torch_load_uses_weights_only():
    calls = [(p, c) for d in ("pipeline", "worker", "scripts") for p in (ROOT / d).rglob("*.py")
             for c in _torch_load_calls(p)]
    assert calls, "expected the model loaders to call torch.load"
    for path, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, (
            f"{path.relative_to(ROOT)}:{call.lineno} calls torch.load without weights_only=True")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_pickle_bomb_checkpoint_is_refused_not_executed(tmp_path):
    from pipeline.models.mnist import MnistNet, load_weights

    _Payload.marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "evil.pt"
    torch.save({"features.0.weight": _Payload()}, ckpt)
    with pytest.raises(ValueError, match="cannot be read as a state dict \\(UnpicklingError\\)"):
        load_weights(MnistNet(), ckpt, "MNIST", "-")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", [
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
    b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8,  # array32 claiming 4 billion items
    b"\x81\xa5image\xc6\x7f\xff\xff\xff" + b"\x00" * 64,  # bin32 claiming 2 GiB
    b"\x81\xdb\x7f\xff\xff\xff" + b"x" * 64,  # str32 key claiming 2 GiB
    b"\x81\xa1a" + b"\x91" * 200_000 + b"\xc0",  # 200,000 nested arrays
    b"\x81\xa1a\xc9\x7f\xff\xff\xff\x01" + b"\x00" * 16,  # ext32 (no ext types are allowed)
])
def test_msgpack_headers_cannot_make_the_worker_allocate(payload):
    tracemalloc.start()
    with pytest.raises(wire.WireError):
        wire.decode_request(payload)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak


# A 28×28 greyscale PNG whose tEXt chunk declares 2 GiB: about 100 bytes on the wire.
_BOMB_SCRIPT = r"""
import resource, struct, sys, zlib
import cv2, numpy as np
from worker import wire
from worker.serve_app import decode_body

def chunk(kind, body, declared=None):
    n = len(body) if declared is None else declared
    return struct.pack(">I", n) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

png = cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes()
iend = png.index(b"IEND") - 4
bomb = png[:33] + chunk(b"tEXt", b"Comment\0" + b"x" * 8, declared=2**31 - 1) + png[iend:]
assert len(bomb) < 200, len(bomb)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
import msgpack
request = msgpack.packb({"v": 1, "id": "x", "image": bomb, "encoding": "png"}, use_bin_type=True)
for attempt in (lambda: wire.decode_request(request), lambda: decode_body(bomb)):
    try:
        attempt()
        errors.append(None)
    except ValueError as e:  # the stream's WireError, the core's InputError
        errors.append(str(e))
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(grown_mb)
print(errors)
"""


def test_a_png_whose_chunk_claims_gigabytes_is_refused_before_any_allocation():
    """The peak RSS of a child process that decodes the bomb from the stream and from the HTTP route (OpenCV's
    native allocations included, which tracemalloc does not see)."""
    import subprocess
    import sys

    from faultkit import child_env

    done = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb, errors = done.stdout.splitlines()[-2:]
    assert float(grown_mb) < 64, f"peak RSS grew by {grown_mb} MiB"
    assert all(e and "declares 2147483647 bytes" in e for e in ast.literal_eval(errors)), errors


def test_the_acl_roles_of_deploy_redis_conf_load_and_allow_each_role_only_its_part(tmp_path):
    """deploy/redis.conf's three ACL users, loaded into the shipped redis-server: the producer can only append
    images (to the shards the worker noted), the worker runs the whole stream (two shards: verdicts, alerts, dead
    letters, the query monitor's and alert windows' per-source state, trimming, backlog), the subscriber reads
    verdicts and alerts; each is refused the others' writes. Passwords with URL-breaking characters."""
    import msgpack

    from pipeline import Detector, load_sample_digits
    from worker.detect import detect_requests
    from worker.feed import push_images
    from worker.local_redis import LocalRedis
    from worker.streams import (
        StreamConsumer,
        StreamNames,
        StreamWorker,
        drain,
        iter_stream,
        note_shards,
        served_shards,
    )

    passwords = {"producer": "p/r#o@d:u%ce", "worker": "w0rk/er#@!", "subscriber": "s?u b&=scr"}
    rules = [line.removeprefix("# ").split() for line in (ROOT / "deploy" / "redis.conf").read_text().splitlines()
             if line.startswith("# user explainer-")]
    assert len(rules) == 3
    names = StreamNames()
    with LocalRedis(tmp_path / "redis", password="admin-pw") as server:
        admin = connect(server.url)
        for rule in rules:
            role = rule[1].removeprefix("explainer-")
            admin.execute_command("ACL", "SETUSER", *[f">{passwords[role]}" if w.startswith(">") else w
                                                      for w in rule[1:]])
        base = f"redis://127.0.0.1:{server.port}/0"

        def as_role(role: str):
            return connect(base, username=f"explainer-{role}", password=passwords[role], retries=0)

        producer, worker_client, subscriber = as_role("producer"), as_role("worker"), as_role("subscriber")
        pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(names.alerts)
        digits = load_sample_digits()
        assert producer.ping()
        note_shards(worker_client, names, 2)
        assert served_shards(producer, names) == served_shards(subscriber, names) == 2
        shards = names.shards(2)
        push_images(producer, names, digits.images[:20], ids=[f"d{i}" for i in range(20)], source="gate-1",
                    shards=2)
        producer.xadd(shards[1].images, {"data": msgpack.packb({"v": 1})})  # undecodable: a dead letter
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.xadd(names.verdicts, {"data": b"forged"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.xreadgroup("g", "c", {names.images: ">"})

        detector = Detector.from_pretrained("mnist")
        handled = 0
        for shard in shards:  # the query monitor is on (by default) and every image has a source
            consumer = StreamConsumer(worker_client, shard, consumer="w", block_ms=100, alert_k=2, alert_n=5)
            consumer.ensure_group()
            worker = StreamWorker(consumer, lambda reqs: detect_requests(detector, reqs))
            handled += drain(worker, int(worker_client.xlen(shard.images)), timeout_s=60)
            assert consumer.backlog() == (0, 0) and consumer.trim_acked() >= 0
        assert handled == 21

        verdicts = [wire.decode_verdict(raw) for s in shards for _sid, raw in iter_stream(subscriber, s.verdicts)]
        assert len(verdicts) == 20 and sum(len(list(iter_stream(subscriber, s.dead))) for s in shards) == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            subscriber.xadd(names.images, {"data": b"x"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker_client.config_set("maxmemory", 1)
        pubsub.close()
