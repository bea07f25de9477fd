"""CW-L∞ as its documented equivalent: PGD on Carlini-Wagner's margin loss inside a fixed L∞ ball.

Carlini & Wagner's own L∞ attack searches for the smallest ``tau`` by repeatedly re-running an L2-style
optimisation; at a fixed budget the standard stand-in (Madry et al.'s "CW" adversary, also the
"PGD-CW" of later robustness evaluations) is projected signed-gradient descent on the CW margin
``max(z_y - max_{j != y} z_j, -kappa)`` with ``kappa = 50``, ``eps = 0.3``, 100 steps of 0.01 from a
random start in the ball. That is what :class:`CWLinf` does; the L∞ distance never exceeds ``eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attacks.base import Attack, cw_loss, input_grad, project_linf, random_linf_start


@dataclass
class CWLinf(Attack):
    """PGD on the CW margin loss: ``eps`` ball radius, ``alpha`` step, ``steps`` iterations, ``kappa``
    confidence at which the loss stops pushing, optional uniform ``random_start`` in the ball."""

    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 100
    kappa: float = 50.0
    random_start: bool = True
    name = "cw-linf"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = random_linf_start(x, self.eps) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = input_grad(lambda v: cw_loss(model(v), y, self.kappa).sum(), x_adv)
            x_adv = project_linf(x_adv - self.alpha * grad.sign(), x, self.eps)
        return x_adv
