"""The adaptive attack on real shipped test digits with the shipped MNIST detector: it stays in its budget and
fools the model, BPDA's forward is the detector's own NLM, knowing the detector lowers the detector's score (what
makes the attack adaptive, so a sign error or a dead gradient fails here), and the sweep keeps each image's
lowest-scoring candidate. Step counts are cut to fit 2 CPU cores; the classes are the real ones."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from evaluation.adaptive_sweep import adaptive_sweep, detector_attack
from evaluation.attacks import ATTACKS, PGD, AdaptivePGD
from evaluation.attacks.adaptive import bpda_nlm, nlm_forward, torch_nlm
from evaluation.metrics import predict, to_tensor, to_uint8
from pipeline import denoise_batch

STEPS = 30


@pytest.fixture(scope="module")
def few(detector, digits) -> tuple[np.ndarray, np.ndarray]:
    """24 even-indexed digits (uint8) the model classifies correctly, and their labels."""
    d = digits.parity("even").spread(40)
    correct = np.flatnonzero(predict(detector.model, d.images) == d.labels)[:24]
    return d.images[correct], d.labels[correct]


@pytest.fixture(scope="module")
def attack(detector) -> AdaptivePGD:
    return detector_attack(detector, steps=STEPS)


@pytest.fixture(scope="module")
def adaptive_adv(detector, few, attack) -> np.ndarray:
    images, labels = few
    return to_uint8(attack(detector.model.net, to_tensor(images), torch.from_numpy(labels)), images)


def scores_of_fooled(detector, adv: np.ndarray, labels: np.ndarray) -> np.ndarray:
    fooled = predict(detector.model, adv) != labels
    assert fooled.any()
    return detector.calibration.score(detector.analyse(adv[fooled]))


def test_registered_with_its_defaults(detector) -> None:
    attack = ATTACKS["adaptive"]()
    assert isinstance(attack, AdaptivePGD) and attack.name == "adaptive"
    assert attack.params()["nlm"] == {"h": 50.0, "h_color": 50.0, "template": 3, "search": 5, "pre_median": 0}
    assert detector_attack(detector).nlm == detector.config.nlm
    with pytest.raises(ValueError, match="nlm_grad"):
        AdaptivePGD(nlm_grad="none")


def test_stays_in_budget_and_fools_the_model(detector, few, adaptive_adv) -> None:
    images, labels = few
    x = to_tensor(images[:4])
    x_adv = detector_attack(detector, steps=3)(detector.model.net, x, torch.from_numpy(labels[:4]))
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert np.abs(adaptive_adv.astype(int) - images.astype(int)).max() <= int(0.3 * 255)
    assert (predict(detector.model, adaptive_adv) != labels).mean() >= 0.8
    assert all(p.grad is None for p in detector.model.net.parameters())


def test_bpda_forward_is_the_detectors_nlm(detector, few) -> None:
    images, _ = few
    x = to_tensor(images).requires_grad_(True)
    expected = denoise_batch(images[..., None], detector.config.nlm)[..., 0]
    for grad in ("identity", "nlm"):
        out = bpda_nlm(x, detector.config.nlm, grad)
        np.testing.assert_array_equal(to_uint8(out, images), expected)
        # the identity passes the gradient straight through; the torch NLM's gradient is a smoothing
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.allclose(g, torch.ones_like(g)) == (grad == "identity")
    # the torch NLM the gradient comes from is OpenCV's filter to within a grey level
    assert (torch_nlm(x.detach(), detector.config.nlm) - nlm_forward(x, detector.config.nlm)).abs().max() < 1 / 255


def test_knowing_the_detector_lowers_its_score(detector, few, attack, adaptive_adv) -> None:
    images, labels = few
    x, y = to_tensor(images), torch.from_numpy(labels)
    torch.manual_seed(0)
    plain = to_uint8(PGD(eps=0.3, alpha=0.02, steps=STEPS)(detector.model.net, x, y), images)
    # the same attack blind to the detector: its margin alone (every evasion weight 0)
    blind = replace(attack, copy_weight=0.0, pred_weight=0.0, map_weight=0.0, residual_weight=0.0,
                    impulse_weight=0.0)
    blind_scores = scores_of_fooled(detector, to_uint8(blind(detector.model.net, x, y), images), labels)
    adaptive = scores_of_fooled(detector, adaptive_adv, labels)
    assert adaptive.mean() < scores_of_fooled(detector, plain, labels).mean()
    assert adaptive.mean() < blind_scores.mean() and np.median(adaptive) < np.median(blind_scores)


def test_the_sweep_keeps_each_images_lowest_score(detector, few) -> None:
    images, labels = few[0][:12], few[1][:12]
    base = detector_attack(detector, steps=10)
    weights = (30.0, 0.0)
    run = adaptive_sweep(detector, images, labels, weights=weights, attack=base, log=lambda _: None)
    # every candidate again (the attack is deterministic without a random start), scored as the sweep scores them
    x, y = to_tensor(images), torch.from_numpy(labels)
    candidates = np.stack([to_uint8(replace(base, map_weight=w)(detector.model.net, x, y), images) for w in weights])
    scores = np.full((len(weights), len(images)), np.inf)
    for k, adv in enumerate(candidates):
        fooled = predict(detector.model, adv) != labels
        scores[k, fooled] = detector.calibration.score(detector.analyse(adv[fooled]))
    has = np.isfinite(scores).any(0)
    np.testing.assert_array_equal(run.source, np.flatnonzero(has))
    np.testing.assert_array_equal(run.images, candidates[scores.argmin(0), np.arange(len(images))][has])
    np.testing.assert_allclose(detector.calibration.score(detector.analyse(run.images)), scores.min(0)[has])
    assert run.attempted == len(images) and run.success_rate == has.mean()
    assert sum(run.params["kept_from_weight"].values()) == len(run.images)
    assert run.params["sweep"] == {"map_weight": list(weights)} and set(run.params["per_weight"]) == {"30", "0"}
    assert run.params["perturbation"]["linf_max"] <= 0.3 + 1e-9 and run.params["eps"] == 0.3
