"""Each stage of the core on real digits: NLM, entropy, the explanation registry, the model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline import METHODS, ExplainParams, NLMParams, denoise_batch, explain, load_model, map_entropy
from pipeline.entropy import distinct_value_entropy


def test_shipped_model_is_accurate_on_real_digits(digits):
    model = load_model("mnist")
    x = torch.from_numpy(digits.images).float().div(255).unsqueeze(1)
    with torch.inference_mode():
        acc = (model(x).argmax(1).numpy() == digits.labels).mean()
    assert acc >= 0.985


def test_nlm_lowers_the_error_of_a_noised_digit(digits):
    # contrast halved into [64, 191] so that zero-mean noise is not clipped into a bias at black/white
    clean = (64 + digits.images[:64, :, :, None] // 2).astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    denoised = denoise_batch(noisy, NLMParams(h=30))
    err_noisy = np.abs(noisy.astype(float) - clean).mean()
    err_denoised = np.abs(denoised.astype(float) - clean).mean()
    assert err_denoised < 0.6 * err_noisy


def test_nlm_handles_colour_and_keeps_shape():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    out = denoise_batch(img, NLMParams(h=10))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_nlm_batch_equals_one_by_one(digits):
    batch = digits.images[:9, :, :, None]
    together = denoise_batch(batch)
    alone = np.concatenate([denoise_batch(batch[i : i + 1]) for i in range(len(batch))])
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("workers", [1, 2])
def test_nlm_mosaic_equals_opencv_per_image(digits, workers):
    """The mosaic is bit-exact against plain per-image OpenCV calls, grey and colour, on a part-filled grid."""
    p = NLMParams()
    grey = digits.images[:11]
    expected = np.stack([cv2.fastNlMeansDenoising(im, None, p.h, p.template, p.search) for im in grey])
    assert np.array_equal(denoise_batch(grey[..., None], p, workers=workers)[..., 0], expected)
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (5, 30, 41, 3), dtype=np.uint8)
    q = NLMParams(h=10, h_color=10)
    expected = np.stack([cv2.fastNlMeansDenoisingColored(im, None, q.h, q.h_color, q.template, q.search)
                         for im in colour])
    assert np.array_equal(denoise_batch(colour, q, workers=workers), expected)


def test_nlm_median_prefilter_runs_before_nlm(digits):
    p = NLMParams(pre_median=3)
    grey = digits.images[:7]
    expected = np.stack([cv2.fastNlMeansDenoising(cv2.medianBlur(im, 3), None, p.h, p.template, p.search)
                         for im in grey])
    assert np.array_equal(denoise_batch(grey[..., None], p)[..., 0], expected)


@pytest.mark.parametrize("variant", ["spatial", "histogram"])
def test_entropy_is_zero_for_a_constant_or_one_hot_map_and_max_for_uniform(variant):
    one_hot = torch.zeros(1, 1, 28, 28)
    one_hot[0, 0, 5, 7] = 3.0
    uniform = torch.ones(1, 1, 28, 28)
    if variant == "spatial":
        assert map_entropy(one_hot, variant).item() == pytest.approx(0.0, abs=1e-6)
        assert map_entropy(uniform, variant).item() == pytest.approx(np.log2(28 * 28), rel=1e-6)
        rand = torch.rand(4, 1, 28, 28)
        assert (map_entropy(rand, variant) < np.log2(28 * 28)).all()
    else:
        assert map_entropy(uniform, variant).item() == pytest.approx(0.0, abs=1e-6)
        spread = torch.linspace(-1, 1, 64 * 10).view(1, 1, 10, 64)
        assert map_entropy(spread, variant, bins=64).item() == pytest.approx(6.0, abs=1e-3)


def test_entropy_is_vectorised_over_the_batch():
    maps = torch.randn(5, 1, 28, 28)
    together = map_entropy(maps)
    alone = torch.cat([map_entropy(maps[i : i + 1]) for i in range(5)])
    assert torch.allclose(together, alone)


def test_the_papers_entropy_is_degenerate_on_float_maps():
    """scikit-image's entropy of a float map is ~log2(pixel count) whatever the map looks like."""
    spread = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    peaked = torch.zeros(3, 1, 28, 28)
    peaked[:, :, 10:14, 10:14] = 1.0
    peaked += 1e-4 * torch.arange(784.0).reshape(1, 1, 28, 28) / 784  # every value distinct, as in a float map
    h_spread, h_peaked = distinct_value_entropy(spread), distinct_value_entropy(peaked)
    assert torch.allclose(h_spread, torch.full((3,), np.log2(784)), atol=1e-3)
    assert torch.allclose(h_peaked, h_spread, atol=1e-3)
    assert (map_entropy(peaked) < map_entropy(spread) - 2).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_returns_maps_of_the_input_shape(method, digits):
    model = load_model("mnist")
    x = torch.from_numpy(digits.images[:6]).float().div(255).unsqueeze(1)
    target = model(x).argmax(1)
    attr = explain(model.net, x, target, method, ExplainParams(steps=4, samples=2), model.gradcam_layer)
    assert attr.shape == x.shape
    assert torch.isfinite(attr).all()
    assert attr.abs().sum() > 0


def test_unknown_method_is_a_clear_error(digits):
    model = load_model("mnist")
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown explanation method 'lime'"):
        explain(model.net, x, torch.tensor([0]), "lime")


@pytest.mark.parametrize("method", ["saliency", "ig"])
def test_predict_and_explain_matches_a_separate_prediction_and_captum_call(method, digits):
    """The fused saliency pass (one forward shared by prediction and gradient) gives Captum's maps exactly."""
    from pipeline import predict_and_explain

    model = load_model("mnist")
    x = torch.from_numpy(digits.images[:8]).float().div(255).unsqueeze(1)
    both = torch.cat([x, x.flip(-1)])  # originals, then copies the model may classify differently
    probs, maps = predict_and_explain(model.net, both, 8, method)
    with torch.inference_mode():
        expected_probs = torch.softmax(model.net(both), dim=1)
    pred = expected_probs[:8].argmax(1)
    expected_maps = explain(model.net, both, torch.cat([pred, pred]), method)
    assert torch.allclose(probs, expected_probs, atol=1e-6)
    assert torch.allclose(maps, expected_maps, atol=1e-6)
    assert maps.abs().sum() > 0
