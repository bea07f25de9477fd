"""Explanation-guided occlusion: the mask follows the map, inpainting touches only the mask, and the detector
turns it into the occlusion_shift signal that a calibration can score."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import Detector, DetectorConfig, load_model
from pipeline.occlude import occlude_top_relevance, top_relevance_masks


def test_mask_covers_the_top_fraction_of_relevance():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 2, 20, 20))  # signed, two channels: relevance is |.| summed over channels
    masks = top_relevance_masks(maps, 0.1)
    relevance = np.abs(maps).sum(1)
    for m, r in zip(masks, relevance, strict=True):
        assert m.sum() == 40
        assert r[m == 1].min() > r[m == 0].max()


def test_a_map_zero_almost_everywhere_masks_only_its_relevant_pixels():
    maps = np.zeros((1, 1, 10, 10))
    maps[0, 0, 2, 3], maps[0, 0, 7, 7] = 1.0, 0.5  # a ReLU'd Grad-CAM: two cells, zero elsewhere
    mask = top_relevance_masks(maps, 0.15)[0]
    assert mask.sum() == 2 and mask[2, 3] == mask[7, 7] == 1


def test_fraction_outside_0_1_is_a_clear_error():
    with pytest.raises(ValueError, match="fraction"):
        top_relevance_masks(np.ones((1, 1, 4, 4)), 1.0)


def test_inpainting_removes_the_relevant_square_and_leaves_the_rest():
    images = np.full((1, 64, 64, 3), 90, np.uint8)
    images[0, 10:20, 30:40] = 250  # a bright "patch" that the map points at
    maps = np.zeros((1, 1, 64, 64), np.float32)
    maps[0, 0, 10:20, 30:40] = 1.0
    maps[0, 0] += np.linspace(0, 1e-3, 64 * 64).reshape(64, 64)  # no ties outside the square
    out = occlude_top_relevance(images, maps, 100 / (64 * 64))
    mask = top_relevance_masks(maps, 100 / (64 * 64))[0].astype(bool)
    assert mask[10:20, 30:40].all()
    assert np.array_equal(out[0][~mask], images[0][~mask])
    assert np.abs(out[0][mask].astype(int) - 90).max() < 20  # filled from the surroundings, not the patch


def test_detector_with_occlusion_scores_the_occlusion_shift(digits):
    config = DetectorConfig(method="gradcam", signals={"prediction_shift": {}, "occlusion_shift": {"fraction": 0.1}})
    det = Detector(load_model("mnist"), config)
    cal = det.calibrate(digits.images[:200], 0.05)
    assert set(cal.signals) == {"prediction_shift", "occlusion_shift"}
    assert DetectorConfig.from_dict(cal.config) == config
    res = det.detect(digits.images[200:216])
    assert (res.signals["occlusion_shift"] >= 0).all()
    assert "occlusion_shift" in res.rows()[0]
    x = det.prepare(digits.images[200:216])
    whole = det.explain_pair(x, det.denoise(x))
    sub = det.explain_pair(x[4:9], det.denoise(x[4:9]))
    part = whole.part(4, 9)
    np.testing.assert_allclose(part.probs, sub.probs, atol=1e-5)
    np.testing.assert_allclose(part.signals["occlusion_shift"], sub.signals["occlusion_shift"], atol=1e-5)


def test_detector_without_occlusion_has_no_occlusion_signal(detector, digits):
    res = detector.detect(digits.images[:8])
    assert "occlusion_shift" not in res.signals and "occlusion_shift" not in res.rows()[0]


def test_occlusion_on_several_threads_equals_one_thread():
    rng = np.random.default_rng(1)
    images = (rng.random((7, 40, 40, 3)) * 255).astype(np.uint8)
    maps = rng.random((7, 3, 40, 40)).astype(np.float32)
    one = occlude_top_relevance(images, maps, 0.05, workers=1)
    np.testing.assert_array_equal(occlude_top_relevance(images, maps, 0.05, workers=3), one)
    assert not np.array_equal(one, images)  # something was inpainted


def test_occlusion_refuses_maps_that_do_not_match_the_images():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="3 images but 2 maps"):
        occlude_top_relevance(images, np.ones((2, 3, 8, 8), np.float32), 0.1)


def test_chunks_mapped_from_inside_the_pool_run_there_instead_of_waiting_on_it():
    from pipeline.threads import cpu_pool, map_chunks

    def fill(chunk, dest):
        dest[:] = chunk * 2

    def nested(chunk, dest):  # a chunk that itself maps chunks, on a pool thread
        map_chunks(fill, chunk, dest, workers=8)

    x, out = np.arange(64), np.zeros(64, int)
    cpu_pool().submit(map_chunks, nested, x, out, 64).result(timeout=30)
    np.testing.assert_array_equal(out, x * 2)
