"""Query fingerprints: bounded size whatever the image, a faithful round trip through bytes, garbage refused, and
the probe rule on the edits it is built for (a camera's noise is not one)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import Fingerprint, ProbeHistory
from pipeline.queries import compare


def test_a_fingerprint_is_small_whatever_the_image_and_round_trips():
    rng = np.random.default_rng(0)
    for shape in ((28, 28), (224, 224, 3), (1080, 1920, 3)):
        fp = Fingerprint.of(rng.integers(0, 256, shape, dtype=np.uint8))
        data = fp.to_bytes()
        assert len(data) < 3000
        back = Fingerprint.from_bytes(data)
        assert back.shape == fp.shape and np.array_equal(back.blocks, fp.blocks)
        assert np.array_equal(back.sketch, fp.sketch)


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\x02\x00\x00\x00\x02\x00\x00\x00" + b"\x00" * 40,
                                  Fingerprint.of(np.zeros((28, 28), np.uint8)).to_bytes()[:-1]])
def test_anything_but_a_fingerprint_is_refused(data):
    with pytest.raises(ValueError, match="not a query fingerprint"):
        Fingerprint.from_bytes(data)


def test_edits_probe_and_noise_an_exact_resend_or_another_image_do_not():
    rng = np.random.default_rng(1)
    scene = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    history = ProbeHistory(4, prints=[Fingerprint.of(scene)])
    square = scene.copy()
    square[40:60, 40:60] = 255 - square[40:60, 40:60]
    tiny = np.clip(scene.astype(int) + rng.choice([-1, 0, 0, 1], scene.shape), 0, 255).astype(np.uint8)
    noisy = np.clip(scene + rng.normal(0, 2, scene.shape), 0, 255).astype(np.uint8)
    assert history.probes(Fingerprint.of(square)) and history.probes(Fingerprint.of(tiny))
    assert not history.probes(Fingerprint.of(noisy))
    assert not history.probes(Fingerprint.of(scene))  # an exact resend
    assert not history.probes(Fingerprint.of(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)))
    assert not history.probes(Fingerprint.of(scene[:200]))  # another shape compares with nothing
    c = compare(Fingerprint.of(noisy), Fingerprint.of(scene))
    assert c.unchanged < 0.05 and 1.5 < c.rms < 2.5  # noise of σ 2 against the scene itself: about 2 RMS
