"""Carlini-Wagner L2 (Carlini & Wagner, 2017), untargeted, batched.

Change of variables ``x_adv = (tanh(w) + 1) / 2`` keeps pixels in [0, 1]; Adam minimises
``||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` per image; a per-image binary search over ``c``
(starting at ``c``, multiplied by 10 until a first success, then bisected) runs ``binary_search_steps`` times,
and the successful iterate with the smallest L2 distance is kept for each image (images never fooled are
returned unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, cw_loss, margin


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


def update_const(
    const: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, succeeded: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CW's per-image binary search: shrink ``c`` after a success, grow it (x10 or bisect) after a failure."""
    upper = torch.where(succeeded, torch.minimum(upper, const), upper)
    lower = torch.where(succeeded, lower, torch.maximum(lower, const))
    const = torch.where(torch.isfinite(upper), (lower + upper) / 2, const * 10)
    return const, lower, upper


@dataclass
class CWL2(Attack):
    """Untargeted CW-L2. ``c``: initial trade-off constant; ``kappa``: confidence margin; ``steps``: Adam
    iterations per binary-search step; ``lr``: Adam step size in tanh space.

    Defaults (5 x 100 iterations, lr 0.1, c starting at 1) are a fast setting for small models; the paper
    used 9 x 10,000 iterations at lr 0.01 starting from c = 1e-3.
    """

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    binary_search_steps: int = 5
    lr: float = 0.1
    name = "cw-l2"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        w0 = to_tanh_space(x)
        const = torch.full((n,), float(self.c), device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_adv = x.clone()
        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for it in range(self.steps + 1):
                with torch.enable_grad():
                    adv = from_tanh_space(w)
                    logits = model(adv)
                    l2 = (adv - x).pow(2).flatten(1).sum(1)
                    loss = (l2 + const * cw_loss(logits, y, self.kappa)).sum()
                with torch.no_grad():
                    ok = margin(logits, y) < -self.kappa
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best_adv = torch.where(better.view(-1, 1, 1, 1), adv, best_adv)
                    succeeded |= ok
                if it == self.steps:
                    break
                (w.grad,) = torch.autograd.grad(loss, [w])
                opt.step()
            const, lower, upper = update_const(const, lower, upper, succeeded)
        return best_adv
