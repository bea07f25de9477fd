"""The photo path through the streaming product: the real MobileNetV2 with the calibration its evaluation made
(Grad-CAM, occlusion, the transplant onto the 8 clean hosts stored in that file, the activation norm), served by a
real Ray Serve application that reads a real redis-server. Camera-style JPEGs of several sizes get the verdicts
the in-process detector gives the same decoded photos.

Its own Ray + Serve start-up (most of a minute on 2 cores), so it is a module of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.datasets import load_imagenet_sample
from pipeline import Detector, read_image_file
from pipeline.models.imagenet import SHARED_WEIGHTS
from worker import wire
from worker.collect import collect_verdicts, last_id
from worker.embedded import embedded_stack
from worker.feed import push_images
from worker.local_redis import free_port
from worker.streams import StreamNames, connect

WEIGHTS = SHARED_WEIGHTS["mobilenet_v2"]
CALIBRATION = Path(__file__).resolve().parents[2] / "reports" / "imagenet" / "calibration.json"
NAMES = StreamNames()

pytestmark = pytest.mark.skipif(not WEIGHTS.exists(), reason="needs ../shared/models/ (MobileNetV2) and photos")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    overrides = {"model": "mobilenet_v2", "weights": str(WEIGHTS), "calibration": str(CALIBRATION), "batch": 8,
                 "block_ms": 100}
    small = {"Explainer": {"user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}}}
    with embedded_stack(data_dir=tmp_path_factory.mktemp("photo-stack"), http_port=free_port(),
                        overrides=overrides, deployment_overrides=small) as st:
        yield st


def test_jpeg_photos_of_several_sizes_get_the_in_process_verdicts(stack):
    photos = [read_image_file(path) for path, _ in load_imagenet_sample()[1::2][:6]]  # odd photos
    assert len({p.shape for p in photos}) > 1
    ids = [f"photo-{i}" for i in range(len(photos))]
    client = connect(stack.redis_url)
    after = last_id(client, NAMES.verdicts)
    push_images(client, NAMES, photos, ids=ids, model="mobilenet_v2", encoding="jpeg")
    got = collect_verdicts(client, NAMES, ids, after, timeout_s=180)
    assert len(got) == len(photos) and all("error" not in v for v in got.values())

    # what the worker decoded: the same JPEG bytes through the same decoder
    sent = [wire.decode_request(wire.encode_request(i, p, encoding="jpeg", model="mobilenet_v2")).image
            for i, p in zip(ids, photos, strict=True)]
    reference = Detector.from_pretrained("mobilenet_v2", weights=WEIGHTS, calibration=CALIBRATION)
    assert reference.hosts is not None and len(reference.hosts) == 8
    expected = reference.detect(sent)
    streamed = [got[i] for i in ids]
    assert [v["predicted_class"] for v in streamed] == expected.predicted_class.tolist()
    assert [v["is_adversarial"] for v in streamed] == expected.is_adversarial.tolist()
    np.testing.assert_allclose([v["score"] for v in streamed], expected.score, rtol=1e-3, atol=1e-4)
    extra = set(reference.config.model_signals())  # feature_distance among them: one value, not its vector
    assert "feature_distance" in extra
    assert all(set(v["signals"]) == extra for v in streamed)
    for name in sorted(extra):
        np.testing.assert_allclose([v["signals"][name] for v in streamed], expected.signals[name],
                                   rtol=1e-3, atol=1e-5)
    assert np.abs([v["signals"]["transplant_gain"] for v in streamed]).max() > 0  # the hosts were pasted onto
