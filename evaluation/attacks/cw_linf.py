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

from evaluation.attacks.base import cw_loss
from evaluation.attacks.pgd import PGD


@dataclass
class CWLinf(PGD):
    """PGD on the CW margin loss: ``eps`` ball radius, ``alpha`` step, ``steps`` iterations, ``kappa``
    confidence at which the loss stops pushing, optional uniform ``random_start`` in the ball."""

    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 100
    kappa: float = 50.0
    random_start: bool = True
    name = "cw-linf"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Ascend the negated CW margin (PGD's loop minimises the margin this way)."""
        return -cw_loss(model(x), y, self.kappa).sum()
