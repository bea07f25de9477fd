"""FGSM (Goodfellow et al., 2015): one signed-gradient step of size ``eps`` on the cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, ce_loss, input_grad


@dataclass
class FGSM(Attack):
    """``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)``; L∞ distance at most ``eps``."""

    eps: float = 0.3
    name = "fgsm"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad = input_grad(lambda v: ce_loss(model, v, y), x)
        return (x + self.eps * grad.sign()).clamp(0.0, 1.0)
