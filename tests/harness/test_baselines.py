"""The two re-run baselines, Feature Squeezing and MagNet, on real shipped MNIST digits.

Thresholds are calibrated on the even-indexed digits and measured on the odd-indexed ones; adversarials are
L∞ PGD (eps 0.3) from odd-indexed digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.baselines import FeatureSqueezing, MagNet
from evaluation.baselines.feature_squeezing import median_filter, reduce_bit_depth
from pipeline.models import load_model
from pipeline.samples import load_sample_digits

TARGET_FPR = 0.05
N_ADV = 120


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(255).unsqueeze(1)


def inline_pgd(net, x, y, eps=0.3, alpha=0.01, steps=40):
    """Minimal L∞ PGD with a random start (used when evaluation.attacks offers no PGD)."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(net(x_adv), y, reduction="sum"), [x_adv])
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.fixture(scope="module")
def model():
    return load_model("mnist")


@pytest.fixture(scope="module")
def split():
    digits = load_sample_digits()
    even, odd = digits.parity("even"), digits.parity("odd")
    return to_tensor(even.images), to_tensor(odd.images), torch.from_numpy(odd.labels)


@pytest.fixture(scope="module")
def adversarials(model, split):
    _, x_odd, y_odd = split
    x, y = x_odd[:N_ADV], y_odd[:N_ADV]
    torch.manual_seed(0)
    try:
        from evaluation.attacks import PGD

        x_adv = PGD(eps=0.3, alpha=0.01, steps=40)(model.net, x, y)
    except ImportError:
        x_adv = inline_pgd(model.net, x, y)
    with torch.inference_mode():
        fooled = (model.net(x_adv).argmax(1) != y).numpy()
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert fooled.mean() > 0.9  # the attack works on this undefended CNN
    return x_adv, fooled


@pytest.fixture(scope="module")
def magnet(model):
    return MagNet.from_pretrained(model)


def median_loop(x: np.ndarray, k: int) -> np.ndarray:
    """Loop reference: scipy.ndimage.median_filter(mode="reflect") semantics written out pixel by pixel."""
    n, c, h, w = x.shape
    before, after = k // 2, k - k // 2 - 1
    padded = np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)), mode="symmetric")
    out = np.empty_like(x)
    for i in range(n):
        for ch in range(c):
            for r in range(h):
                for col in range(w):
                    window = np.sort(padded[i, ch, r : r + k, col : col + k].ravel())
                    out[i, ch, r, col] = window[k * k // 2]
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_median_filter_matches_loop_reference(split, k):
    x_even = split[0][:4]
    rgb = torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(k))
    for x in (x_even, rgb):
        np.testing.assert_array_equal(median_filter(x, k).numpy(), median_loop(x.numpy(), k))
    try:
        from scipy.ndimage import median_filter as scipy_median
    except ImportError:
        return
    np.testing.assert_array_equal(median_filter(rgb, k).numpy(), scipy_median(rgb.numpy(), size=(1, 1, k, k)))


def test_bit_depth_reduction():
    x = torch.tensor([0.0, 0.2, 0.49, 0.51, 1.0])
    assert reduce_bit_depth(x, 1).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(reduce_bit_depth(x, 5) * 31, torch.round(x * 31))


def test_feature_squeezing_fpr_and_pgd(model, split, adversarials):
    x_even, x_odd, _ = split
    fs = FeatureSqueezing(model)
    assert set(fs.squeezers) == {"bit_depth_1", "median_2x2"}
    fs.calibrate(x_even, TARGET_FPR)
    fpr = fs.detect(x_odd).mean()
    assert abs(fpr - TARGET_FPR) < 0.03, fpr
    x_adv, fooled = adversarials
    tpr = fs.detect(x_adv)[fooled].mean()
    assert tpr > 0.8 and tpr > 5 * fpr, (tpr, fpr)
    # ImageNet setting is constructible and scores RGB batches.
    rgb = FeatureSqueezing(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10)), bit_depth=5)
    assert rgb.score(torch.rand(2, 3, 16, 16)).shape == (2,)


def test_magnet_fpr_and_pgd(magnet, split, adversarials):
    x_even, x_odd, _ = split
    thresholds = magnet.calibrate(x_even, TARGET_FPR)
    assert set(thresholds) == {"recon_I", "recon_II", "jsd_T10", "jsd_T40"}
    cal = magnet.calibration
    assert cal["even_split_combined_fpr"] <= cal["combined_fpr"] <= TARGET_FPR
    fpr = magnet.detect(x_odd).mean()
    assert abs(fpr - TARGET_FPR) < 0.03, fpr
    x_adv, fooled = adversarials
    flagged = magnet.detect(x_adv)
    tpr = flagged[fooled].mean()
    assert tpr > 0.8 and tpr > 5 * fpr, (tpr, fpr)
    # the combined score is the "any detector fires" rule on a continuous scale
    per = magnet.detect_all(x_adv)
    np.testing.assert_array_equal(flagged, np.any(np.stack(list(per.values())), axis=0))
    scores = magnet.score_all(x_odd[:10])
    assert all(v.shape == (10,) and np.all(v >= 0) for v in scores.values())


def test_autoencoders_reconstruct_clean_digits(magnet, split, model):
    _, x_odd, y_odd = split
    with torch.inference_mode():
        rec1, rec2 = magnet.ae1(x_odd), magnet.ae2(x_odd)
        noise = torch.rand_like(x_odd[:100])
        noise_err = (magnet.ae1(noise) - noise).pow(2).mean().item()
    mse1 = (rec1 - x_odd).pow(2).mean().item()
    mae2 = (rec2 - x_odd).abs().mean().item()
    assert mse1 < 0.01 and mae2 < 0.05, (mse1, mae2)
    assert noise_err > 10 * mse1
    # the reformer keeps clean accuracy
    reformed = magnet.reform(x_odd)
    assert reformed.shape == x_odd.shape and 0 <= reformed.min() and reformed.max() <= 1
    acc = (magnet.classify_reformed(x_odd) == y_odd.numpy()).mean()
    assert acc > 0.97, acc
