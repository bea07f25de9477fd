"""L2 PGD and the black-box Square Attack on real MNIST test digits with the shipped model: budgets, [0, 1],
success rates, query accounting, no gradients for Square, reproducibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.attacks import ATTACKS, PGDL2, Attack, SquareAttack
from evaluation.attacks.pgd_l2 import project_l2
from evaluation.attacks.square import square_fraction, square_side
from evaluation.datasets import load_test_digits
from pipeline.models import load_model

N = 64


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.set_num_threads(2)
    return load_model("mnist").net


@pytest.fixture(scope="module")
def digits(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_test_digits().parity("odd").spread(N)
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


class NoGradProbe(nn.Module):
    """Wraps a model: fails if called with gradients enabled or on an input that requires grad, and records
    the batch size of every call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.batches: list[int] = []
        self.train(net.training)  # the attack restores the wrapper's mode, and with it the net's, afterwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not x.requires_grad
        self.batches.append(len(x))
        out = self.net(x)
        assert not out.requires_grad
        return out


def test_registry() -> None:
    assert isinstance(ATTACKS["pgd-l2"](), PGDL2) and isinstance(ATTACKS["square"](), SquareAttack)
    assert ATTACKS["pgd-l2"]().params() == {"eps": 2.0, "alpha": 0.1, "steps": 50, "random_start": True}
    assert ATTACKS["square"]().params() == {"eps": 0.3, "n_queries": 1000, "p_init": 0.8, "seed": 0, "levels": 255}
    assert ATTACKS["square"]().name == "square" and ATTACKS["pgd-l2"]().name == "pgd-l2"
    assert isinstance(ATTACKS["square"](n_queries=10), Attack)


def test_project_l2() -> None:
    x = torch.full((3, 1, 4, 4), 0.5)
    delta = torch.zeros_like(x)
    delta[0, 0, 0, 0] = 0.1  # inside the ball: unchanged
    delta[1, 0, 0, :] = 0.4  # norm 0.8 > 0.5: scaled to 0.5
    delta[2, 0, 0, 0] = 3.0  # scaled to 0.5 along one pixel: 1.0, at the box's edge
    out = project_l2(x + delta, x, eps=0.5)
    norms = (out - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.tensor([0.1, 0.5, 0.5]))
    torch.testing.assert_close(out[1, 0, 0], torch.full((4,), 0.75))
    # clipping to [0, 1] after scaling only shrinks the perturbation
    far = project_l2(x + torch.randn_like(x) * 5, x, eps=1.0)
    assert far.min() >= 0 and far.max() <= 1 and ((far - x).flatten(1).norm(dim=1) <= 1.0 + 1e-6).all()


def test_pgd_l2_budget_and_success(net: nn.Module, digits) -> None:
    x, y, correct = digits
    torch.manual_seed(0)
    x_adv = PGDL2()(net, x, y)
    check_output(x_adv, x)
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    assert (l2 <= 2.0 + 1e-4).all()
    assert l2.median() > 1.9  # the attack uses its budget (it never stops early)
    # about 86% of undefended MNIST digits have an adversarial within L2 2.0 that PGD finds (500 even digits)
    assert success_rate(net, x_adv, y, correct) >= 0.75
    assert all(p.grad is None for p in net.parameters())


def test_pgd_l2_small_budget_respected(net: nn.Module, digits) -> None:
    x, y, _ = digits
    x_adv = PGDL2(eps=0.5, alpha=0.3, steps=4, random_start=False)(net, x[:16], y[:16])
    assert ((x_adv - x[:16]).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    torch.manual_seed(1)
    a = PGDL2(eps=0.5, alpha=0.3, steps=2)(net, x[:4], y[:4])
    torch.manual_seed(1)
    torch.testing.assert_close(PGDL2(eps=0.5, alpha=0.3, steps=2)(net, x[:4], y[:4]), a, rtol=0, atol=0)


def test_square_budget_success_and_no_gradients(net: nn.Module, digits) -> None:
    x, y, correct = digits
    probe = NoGradProbe(net)
    attack = SquareAttack()
    x_adv = attack(probe, x, y)
    check_output(x_adv, x)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    # on the uint8 grid (76/255 steps from uint8 digits): quantising changes nothing
    torch.testing.assert_close(x_adv, (x_adv * 255).round() / 255, rtol=0, atol=1e-6)
    assert success_rate(net, x_adv, y, correct) >= 0.95
    assert all(p.grad is None for p in net.parameters())

    queries = attack.last_queries
    assert queries is not None and queries.shape == (N,)
    assert (queries >= 1).all() and (queries <= attack.n_queries).all()
    # batched: one call per iteration for all images still active, and each call's batch is exactly those images
    assert len(probe.batches) == int(queries.max())
    assert probe.batches[0] == N and sum(probe.batches) == int(queries.sum())
    assert probe.batches == sorted(probe.batches, reverse=True)
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
    assert queries[fooled & correct].float().median() < 200  # typically a few dozen


def test_square_reproducible(net: nn.Module, digits) -> None:
    x, y, _ = digits
    x, y = x[:16], y[:16]
    a, b = SquareAttack(n_queries=50, seed=3), SquareAttack(n_queries=50, seed=3)
    x_a, x_b = a(net, x, y), b(net, x, y)
    assert torch.equal(x_a, x_b) and torch.equal(a.last_queries, b.last_queries)
    assert torch.equal(a(net, x, y), x_a)  # each call restarts the generator
    assert not torch.equal(SquareAttack(n_queries=50, seed=4)(net, x, y), x_a)


def test_square_unrounded_eps_and_tiny_budget(net: nn.Module, digits) -> None:
    x, y, _ = digits
    x, y = x[:16], y[:16]
    x_adv = SquareAttack(eps=0.1, n_queries=30, levels=0)(net, x, y)
    delta = (x_adv - x).abs()
    assert delta.max() <= 0.1 + 1e-6
    assert (delta - 0.1).abs().lt(1e-6).any()  # the step is eps itself
    # a single query: the stripes alone, one ±eps sign per column
    probe = NoGradProbe(net)
    attack = SquareAttack(n_queries=1, levels=0)
    stripes = attack(probe, x, y)
    assert probe.batches == [16] and (attack.last_queries == 1).all()
    signed = torch.sign(stripes - x)
    interior = (x > 0.3) & (x < 0.7)  # no clipping there
    col_sign = torch.where(interior, signed, 0).sum(2).sign()
    assert ((signed == col_sign[:, :, None, :]) | ~interior).all()


def test_square_rgb_toy_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = (torch.randint(0, 256, (6, 3, 32, 32)) / 255).float()
    y = torch.zeros(6, dtype=torch.long)
    attack = SquareAttack(eps=8 / 255, n_queries=40, p_init=0.1)
    x_adv = attack(model, x, y)
    check_output(x_adv, x)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert attack.last_queries.shape == (6,)


def test_square_schedule() -> None:
    assert square_fraction(0.8, 0, 1000) == 0.8
    assert square_fraction(0.8, 1, 1000) == 0.8  # 10/10,000 of the budget: not yet halved
    assert square_fraction(0.8, 2, 1000) == 0.4
    assert square_fraction(0.8, 999, 1000) == 0.8 / 512
    fractions = [square_fraction(0.8, it, 1000) for it in range(1000)]
    assert fractions == sorted(fractions, reverse=True)
    assert square_side(0.8, 28, 28) == 25  # round(sqrt(0.8 * 784))
    assert square_side(1.0, 28, 28) == 27 and square_side(1e-6, 28, 28) == 1


def test_hop_skip_jump_walks_the_boundary_towards_the_original(net: nn.Module, digits) -> None:
    """Decision-based: from uniform noise the model misreads, every result is misclassified, on the uint8 grid,
    within the query budget, and more queries bring it closer to the original."""
    from evaluation.attacks.hop_skip_jump import HopSkipJump

    x, y, correct = digits
    x, y = x[correct][:4], y[correct][:4]
    short, long = HopSkipJump(max_queries=400), HopSkipJump(max_queries=2500)
    near, far = long(net, x, y), short(net, x, y)
    with torch.no_grad():
        assert (net(near).argmax(1) != y).all() and (net(far).argmax(1) != y).all()
    assert torch.equal(near, near.mul(255).round().div(255))
    assert (long.last_queries <= 2500).all() and (short.last_queries <= 400).all()
    assert (long.last_distance < short.last_distance).all()
    assert long.last_distance.median() < 3.5  # L2 on [0, 1] digits
