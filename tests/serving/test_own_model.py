"""A user's own classifier from training to the stream: a small residual network (not the shipped CNN's
architecture) trained for a few seconds on real MNIST training digits and exported with ``torch.export``, is
calibrated through ``explainer calibrate`` on clean even-indexed test digits, saved as a bundle, and served by a
real Ray Serve application next to the shipped MNIST detector; requests pick a detector by ``model``.

The same bundle gives the same verdicts through ``explainer detect``, ``Detector.load`` and the stream, and its
false-positive rate on the held-out odd digits stays within the calibration's target (a binomial bound).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.datasets import load_mnist, mnist_dir
from pipeline import Detector, load_adversarial_digits, load_sample_digits
from worker import wire
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack
from worker.feed import push_images
from worker.local_redis import free_port
from worker.streams import StreamNames, connect, iter_stream

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAME = "tiny-resnet"
TARGET_FPR, CONFIDENCE = 0.05, 0.99
NAMES = StreamNames()


def _have_mnist_train() -> bool:
    try:
        mnist_dir()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_mnist_train(), reason="needs ../shared/data/mnist (training digits)")


def explainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(FIXTURES)}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def write_pngs(folder: Path, images: np.ndarray, indices: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"{i:05d}.png" for i in indices]
    for path, image in zip(paths, images, strict=True):
        cv2.imwrite(str(path), image)
    return paths


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The user's side: a trained network exported to tiny.pt2, clean even digits and held-out odd ones as PNGs,
    and the bundle ``explainer calibrate`` made from them."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import tiny_resnet
    finally:
        sys.path.remove(str(FIXTURES))
    root = tmp_path_factory.mktemp("own-model")
    images, labels = load_mnist("train")
    net = tiny_resnet.train(images[:6000], labels[:6000], epochs=2)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},)),
                      root / "tiny.pt2")
    digits = load_sample_digits()
    for parity in ("even", "odd"):
        half = digits.parity(parity)
        write_pngs(root / parity, half.images, half.indices)
    done = explainer("calibrate", "--model", "tiny.pt2", "--input-size", "28", "--channels", "1",
                     "--images-dir", "even", "--name", NAME, "--target-fpr", str(TARGET_FPR),
                     "--confidence", str(CONFIDENCE), "--out", "bundle", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "threshold" in done.stdout and (root / "bundle" / "detector.json").is_file()
    return root


def binomial_upper(n: int, p: float, quantile: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= quantile."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
                        + (n - k) * math.log1p(-p))
        if cdf >= quantile:
            return k
    return n


def test_the_bundle_records_the_model_and_its_calibration(work):
    manifest = json.loads((work / "bundle" / "detector.json").read_text())
    assert manifest["name"] == NAME and manifest["model"]["source"]["kind"] == "exported"
    assert manifest["model"]["input_size"] == 28 and manifest["model"]["channels"] == 1
    det = Detector.load(work / "bundle", trust_code=True)
    assert det.model.name == NAME and det.calibration is not None
    assert det.calibration.target_fpr == TARGET_FPR and det.calibration.confidence == CONFIDENCE
    assert det.calibration.n_reference + det.calibration.n_threshold == 1000  # every even digit


def test_held_out_fpr_is_within_the_calibrated_target(work):
    """The threshold holds the target FPR with 99% confidence; the held-out count may then exceed the target's
    expectation only by the binomial spread of 1,000 draws (99.9% quantile)."""
    odd = load_sample_digits().parity("odd")
    flagged = int(Detector.load(work / "bundle", trust_code=True).detect(odd.images).is_adversarial.sum())
    bound = binomial_upper(len(odd.images), TARGET_FPR, 0.999)
    assert flagged <= bound, f"{flagged} of {len(odd.images)} clean digits flagged (bound {bound})"


TOKEN = "t0k/en#with:odd=chars"


@pytest.fixture(scope="module")
def stack(work, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secrets") / "http-token"
    token_file.write_text(TOKEN + "\n")
    # and the window alert policy: one alert when 3 of a source's last 5 images are flagged
    overrides = {"detector": ["mnist", "mnist-robust", str(work / "bundle")], "trust_code": True, "block_ms": 100,
                 "http_token_file": str(token_file), "alert_k": 3, "alert_n": 5}
    with embedded_stack(data_dir=tmp_path_factory.mktemp("own-stack"), http_port=free_port(),
                        overrides=overrides) as st:
        yield st


def test_requests_pick_their_detector_and_get_the_verdicts_of_detect_and_load(work, stack):
    client = connect(stack.redis_url)
    odd = load_sample_digits().parity("odd")
    adv = load_adversarial_digits().head(100)
    own = np.concatenate([odd.images, adv.images])
    own_ids = [f"own-{i}" for i in range(len(own))]
    shipped = odd.images[:200]
    shipped_ids = [f"shipped-{i}" for i in range(len(shipped))]
    robust = np.concatenate([odd.images[:50], adv.images[:50]])  # the shipped robust detector, by its name
    robust_ids = [f"robust-{i}" for i in range(len(robust))]
    after = last_id(client, NAMES.verdicts)
    dead_after = last_id(client, NAMES.dead)
    push_images(client, NAMES, own, ids=own_ids, model=NAME)
    push_images(client, NAMES, shipped, ids=shipped_ids, model="mnist")
    push_images(client, NAMES, robust, ids=robust_ids, model="mnist-robust")
    push_images(client, NAMES, odd.images[:1], ids=["nobody"], model="no-such-model")
    got = collect_verdicts(client, NAMES, own_ids + shipped_ids + robust_ids, after, timeout_s=300)
    assert len(got) == len(own_ids) + len(shipped_ids) + len(robust_ids)
    assert all("error" not in v for v in got.values())

    # each request was judged by the detector it named
    local = Detector.load(work / "bundle", trust_code=True)
    expected = local.detect(own)
    streamed = [got[i] for i in own_ids]
    assert {v["model"] for v in streamed} == {NAME}
    assert [v["predicted_class"] for v in streamed] == expected.predicted_class.tolist()
    assert [v["is_adversarial"] for v in streamed] == expected.is_adversarial.tolist()
    assert np.allclose([v["score"] for v in streamed], expected.score, rtol=1e-4, atol=1e-4)
    reference = Detector.from_pretrained("mnist").detect(shipped)
    assert [got[i]["is_adversarial"] for i in shipped_ids] == reference.is_adversarial.tolist()
    assert np.allclose([got[i]["score"] for i in shipped_ids], reference.score, rtol=1e-4, atol=1e-4)
    robust_reference = Detector.from_pretrained("mnist-robust").detect(robust)
    assert {got[i]["model"] for i in robust_ids} == {"mnist-robust"}
    assert [got[i]["is_adversarial"] for i in robust_ids] == robust_reference.is_adversarial.tolist()
    assert np.allclose([got[i]["score"] for i in robust_ids], robust_reference.score, rtol=1e-4, atol=1e-4)

    # the held-out clean digits' streamed verdicts keep the FPR bound
    flagged = sum(got[f"own-{i}"]["is_adversarial"] for i in range(len(odd.images)))
    assert flagged <= binomial_upper(len(odd.images), TARGET_FPR, 0.999)

    # explainer detect on the same digits as PNG files, a folder at a time: the same verdicts
    done = explainer("detect", "--detector", "bundle", "--trust-code", "odd", "--out", "odd.jsonl", cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (work / "odd.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == [f"{i:05d}.png" for i in odd.indices]
    assert [r["is_adversarial"] for r in rows] == expected.is_adversarial[: len(odd.images)].tolist()
    assert np.allclose([r["score"] for r in rows], expected.score[: len(odd.images)], rtol=1e-6, atol=1e-6)

    # a model nobody serves: a dead letter that says so, and no verdict
    dead = [wire.decode_dead_letter(raw) for _sid, raw in iter_stream(client, NAMES.dead, dead_after)]
    unknown = [d for d in dead if d.get("kind") == "unknown_model"]
    assert len(unknown) == 1 and "no-such-model" in unknown[0]["reason"] and NAME in unknown[0]["reason"]
    assert int(client.xpending(NAMES.images, NAMES.group)["pending"]) == 0


def test_the_serve_config_alerts_once_per_episode_of_a_source(stack):
    """The window policy set in the Serve args: a camera sending adversarials opens one episode, a clean one
    none, and every verdict still lands, carrying its source."""
    client = connect(stack.redis_url)
    after, episodes_after = last_id(client, NAMES.verdicts), last_id(client, NAMES.episodes)
    clean, adv = load_sample_digits().parity("odd").images[:10], load_adversarial_digits().images[:5]
    push_images(client, NAMES, clean, ids=[f"lobby-{i}" for i in range(10)], source="lobby")
    push_images(client, NAMES, adv, ids=[f"gate-{i}" for i in range(5)], source="gate")
    ids = [f"lobby-{i}" for i in range(10)] + [f"gate-{i}" for i in range(5)]
    got = collect_verdicts(client, NAMES, ids, after, timeout_s=120)
    assert {got[i]["source"] for i in ids} == {"lobby", "gate"}
    flagged_gate = [i for i in ids[10:] if got[i]["is_adversarial"]]
    assert len(flagged_gate) >= 3
    episodes = [wire.decode_alert(raw) for _sid, raw in iter_stream(client, NAMES.episodes, episodes_after)]
    assert [e["source"] for e in episodes] == ["gate"]
    entries = [e["id"] for e in episodes[0]["entries"]]  # consumers in parallel may write a source's out of order
    assert len(entries) == 3 and set(entries) <= set(flagged_gate)


def test_the_standalone_worker_serves_the_bundle_beside_mnist(work, tmp_path):
    """``python -m worker.standalone --detector BUNDLE --model mnist``: the same routing without Ray."""
    from worker.local_redis import LocalRedis
    from worker.standalone import build_workers, parse_args
    from worker.streams import drain

    odd = load_sample_digits().parity("odd")
    with LocalRedis(tmp_path / "redis") as server:
        names = StreamNames.with_prefix("standalone")
        [worker] = build_workers(parse_args(["--redis-url", server.url, "--prefix", "standalone",
                                             "--detector", str(work / "bundle"), "--trust-code", "--model",
                                             "mnist"]))
        worker.consumer.ensure_group()
        client = connect(server.url)
        push_images(client, names, odd.images[:40], ids=[f"a-{i}" for i in range(40)], model=NAME)
        push_images(client, names, odd.images[:40], ids=[f"b-{i}" for i in range(40)], model="mnist")
        push_images(client, names, odd.images[:1], ids=["c"], model="cifar")
        assert drain(worker, 81, timeout_s=120) == 81
        got = collect_verdicts(client, names, [f"a-{i}" for i in range(40)] + [f"b-{i}" for i in range(40)],
                               timeout_s=10)
        own = Detector.load(work / "bundle", trust_code=True).detect(odd.images[:40])
        assert [got[f"a-{i}"]["score"] for i in range(40)] == pytest.approx(own.score.tolist(), abs=1e-5)
        assert {got[f"b-{i}"]["model"] for i in range(40)} == {"mnist"}
        dead = [wire.decode_dead_letter(raw) for _sid, raw in iter_stream(client, names.dead)]
        assert [d["kind"] for d in dead] == ["unknown_model"] and "'cifar'" in dead[0]["reason"]


def test_the_http_route_needs_the_token_and_picks_the_detector_by_model(work, stack):
    import urllib.error
    import urllib.request

    image = load_sample_digits().parity("odd").images[0]
    body = cv2.imencode(".png", image)[1].tobytes()

    def call(path: str, token: str | None = TOKEN, data: bytes | None = body) -> dict:
        headers = {"Content-Type": "image/png"} if data is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"{stack.http_url}{path}", data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    for token in (None, "wrong", TOKEN + "x"):
        with pytest.raises(urllib.error.HTTPError) as err:
            call("/detect", token)
        assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == "Bearer"
    assert call("/healthz", None, None) == {"status": "ok"}  # liveness only, no internals
    assert call("/healthz", TOKEN, None)["models"] == ["mnist", "mnist-robust", NAME]

    own = call(f"/detect?model={NAME}")
    assert own["model"] == NAME
    local = Detector.load(work / "bundle", trust_code=True)
    assert own["score"] == pytest.approx(float(local.detect(image[None]).score[0]), abs=1e-5)
    assert call("/detect")["model"] == "mnist"  # the first detector listed
    with pytest.raises(urllib.error.HTTPError) as err:
        call("/detect?model=cifar")
    assert err.value.code == 404 and NAME in err.value.read().decode()
