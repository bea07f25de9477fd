"""Issue 6, item 6: AUTH and TLS end to end, weights_only loading, msgpack limits. (The HTTP route's body limit
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
