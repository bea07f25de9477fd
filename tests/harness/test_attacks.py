"""The attacks on real shipped digits with the shipped MNIST model: norm bounds, [0, 1] range, success rates.

Iteration counts are cut where the defaults would be slow on 2 CPU cores; the classes are the real ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.attacks import ATTACKS, BIM, CWL0, CWL2, FGSM, MIM, PGD, AdversarialPatch, Attack, CWLinf
from pipeline.models import load_model
from pipeline.samples import load_sample_digits

N = 64


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.set_num_threads(2)
    return load_model("mnist").net


@pytest.fixture(scope="module")
def digits(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_sample_digits().parity("odd").head(N)
    x = torch.from_numpy(d.images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(d.labels)
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    return x, y, correct


def success_rate(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, correct: torch.Tensor) -> float:
    with torch.no_grad():
        pred = net(x_adv).argmax(1)
    return (pred[correct] != y[correct]).float().mean().item()


def check_output(x_adv: torch.Tensor, x: torch.Tensor) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_registry_has_every_attack() -> None:
    assert set(ATTACKS) == {"fgsm", "pgd", "bim", "bim-early", "mim", "cw-l2", "cw-linf", "cw-l0", "patch", "pgd-l2",
                            "square", "pgd-0.1", "adaptive", "adaptive-0.1", "adaptive-0.2"}
    for factory in ATTACKS.values():
        assert isinstance(factory(), Attack)
    assert ATTACKS["pgd"]().params() == {"eps": 0.3, "alpha": 0.01, "steps": 40, "random_start": True}
    for eps in (0.1, 0.2):  # the adaptive attack at smaller budgets: only eps and its step change
        smaller = ATTACKS[f"adaptive-{eps:g}"]().params()
        assert (smaller["eps"], smaller["alpha"]) == (eps, eps / 15)
        assert {k: v for k, v in smaller.items() if k not in ("eps", "alpha")} == {
            k: v for k, v in ATTACKS["adaptive"]().params().items() if k not in ("eps", "alpha")}


def test_model_left_untouched(net: nn.Module, digits) -> None:
    x, y, _ = digits
    net.train()
    try:
        PGD(steps=2)(net, x[:8], y[:8])
        assert net.training  # mode restored
    finally:
        net.eval()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


def test_clean_accuracy_is_high(digits) -> None:
    assert digits[2].float().mean() >= 0.95


def test_fgsm(net: nn.Module, digits) -> None:
    x, y, correct = digits
    x_adv = FGSM(eps=0.3)(net, x, y)
    check_output(x_adv, x)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert success_rate(net, x_adv, y, correct) >= 0.5


@pytest.mark.parametrize(
    "attack",
    [PGD(eps=0.3, alpha=0.02, steps=20), BIM(eps=0.3, alpha=0.02, steps=20), MIM(eps=0.3, steps=10),
     CWLinf(eps=0.3, alpha=0.03, steps=15)],
    ids=["pgd", "bim", "mim", "cw-linf"],
)
def test_linf_attacks(net: nn.Module, digits, attack: Attack) -> None:
    x, y, correct = digits
    x_adv = attack(net, x, y)
    check_output(x_adv, x)
    assert (x_adv - x).abs().max() <= attack.eps + 1e-6
    assert success_rate(net, x_adv, y, correct) >= 0.9


def test_early_stopped_bim_stops_at_the_boundary(net: nn.Module, digits) -> None:
    """Each image is frozen once misclassified: as successful as the full attack, within the same bound, but
    closer to the clean image and far less confident than the full attack's overshoot."""
    x, y, correct = digits
    full, early = BIM(eps=0.3, alpha=0.02, steps=20), BIM(eps=0.3, alpha=0.02, steps=20, early_stop=True)
    x_full, x_early = full(net, x, y), early(net, x, y)
    check_output(x_early, x)
    assert (x_early - x).abs().max() <= 0.3 + 1e-6
    assert success_rate(net, x_early, y, correct) >= 0.9
    fooled = correct & (net(x_early).argmax(1) != y)
    with torch.no_grad():
        conf_early = torch.softmax(net(x_early[fooled]), 1).amax(1)
        conf_full = torch.softmax(net(x_full[fooled]), 1).amax(1)
    assert conf_early.median() < 0.9 < conf_full.median()
    assert ((x_early - x).abs().flatten(1).sum(1) <= (x_full - x).abs().flatten(1).sum(1) + 1e-4)[fooled].all()
    # each one is the full attack's iterate at the first step that fooled the model
    first = torch.full((len(x),), -1)
    for k in range(1, 21):
        x_k = BIM(eps=0.3, alpha=0.02, steps=k)(net, x, y)
        with torch.no_grad():
            newly = (first < 0) & (net(x_k).argmax(1) != y)
        for i in torch.nonzero(newly).flatten().tolist():
            first[i] = k
            torch.testing.assert_close(x_early[i], x_k[i], atol=1e-6, rtol=0)
    assert (first[fooled] > 0).all()


def test_pgd_small_eps_respected(net: nn.Module, digits) -> None:
    x, y, _ = digits
    x_adv = PGD(eps=0.05, alpha=0.02, steps=3)(net, x[:16], y[:16])
    assert (x_adv - x[:16]).abs().max() <= 0.05 + 1e-6


def test_cw_l2(net: nn.Module, digits) -> None:
    x, y, correct = digits
    x, y, correct = x[:32], y[:32], correct[:32]
    x_adv = CWL2(steps=40, binary_search_steps=3)(net, x, y)
    check_output(x_adv, x)
    assert success_rate(net, x_adv, y, correct) >= 0.8
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    fooled = net(x_adv).argmax(1) != y
    assert l2[fooled].mean() < 3.0  # minimal perturbations, far below PGD's ~5
    assert torch.equal(x_adv[~fooled], x[~fooled]) or (l2[~fooled] < 1e-4).all()


def test_cw_l0(net: nn.Module, digits) -> None:
    x, y, correct = digits
    x, y, correct = x[:20], y[:20], correct[:20]
    attack = CWL0(max_pixels=60, first_steps=40, steps=15, rounds=10, shrink=0.7)
    x_adv = attack(net, x, y)
    check_output(x_adv, x)
    changed = (x_adv != x).flatten(1).sum(1)
    assert changed.max() <= 60
    assert success_rate(net, x_adv, y, correct) >= 0.8


def test_cw_l0_tight_bound_holds(net: nn.Module, digits) -> None:
    x, y, _ = digits
    x_adv = CWL0(max_pixels=5, first_steps=10, steps=5, rounds=2)(net, x[:8], y[:8])
    assert (x_adv != x[:8]).flatten(1).sum(1).max() <= 5


@pytest.fixture(scope="module")
def patch_attack(net: nn.Module) -> AdversarialPatch:
    train = load_sample_digits().parity("even").head(128)
    images = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    attack = AdversarialPatch(patch_size=12, target_class=8, lr=0.1, batch_size=32, seed=0)
    return attack.fit(net, images, steps=100)


def test_patch_only_changes_its_box(net: nn.Module, digits, patch_attack: AdversarialPatch) -> None:
    x, y, correct = digits
    x_adv = patch_attack(net, x, y)
    check_output(x_adv, x)
    boxes = patch_attack.last_boxes
    rows = torch.arange(28)[None, :, None]
    cols = torch.arange(28)[None, None, :]
    top, left, side = boxes[:, 0, None, None], boxes[:, 1, None, None], boxes[:, 2, None, None]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    assert (side == 12).all()
    assert torch.equal(x_adv[:, 0][~inside], x[:, 0][~inside])
    assert ((x_adv != x).flatten(1).sum(1) <= 12 * 12).all()
    with torch.no_grad():
        pred = net(x_adv).argmax(1)
    # A universal patch on 18% of a digit: far weaker than per-image attacks, but it moves towards its target.
    assert (pred == 8).float().mean() >= 0.15
    assert success_rate(net, x_adv, y, correct) >= 0.2


def test_patch_transformed_and_rgb_224() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10)).eval()
    x = torch.rand(4, 3, 224, 224)
    y = torch.zeros(4, dtype=torch.long)
    attack = AdversarialPatch(patch_size=40, target_class=3, steps=3, batch_size=4, scale=(0.8, 1.2), rotation=30)
    attack.fit(model, x)
    assert attack.patch.shape == (3, 40, 40)
    x_adv = attack(model, x, y)
    check_output(x_adv, x)
    side = attack.box_size
    assert side == 68  # ceil(40 * 1.2 * sqrt(2))
    changed = (x_adv != x).any(1).flatten(1).sum(1)
    assert (changed > 0).all() and (changed <= side * side).all()
