"""PGD (Madry et al., 2018): projected signed-gradient ascent on the cross-entropy inside an L∞ ball."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, ce_loss, input_grad, project_linf, random_linf_start


@dataclass
class PGD(Attack):
    """L∞ PGD: optional uniform random start in the ball, then ``steps`` steps of ``alpha * sign(grad)``,
    each projected back onto the ``eps`` ball and [0, 1]. Madry's MNIST setting: eps 0.3, alpha 0.01, 40 steps.
    """

    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 40
    random_start: bool = True
    name = "pgd"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss each step ascends (cross-entropy; subclasses change it)."""
        return ce_loss(model, x, y)

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = random_linf_start(x, self.eps) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = input_grad(lambda v: self.loss(model, v, y), x_adv)
            x_adv = project_linf(x_adv + self.alpha * grad.sign(), x, self.eps)
        return x_adv
