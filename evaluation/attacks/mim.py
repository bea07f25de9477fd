"""MIM / MI-FGSM (Dong et al., 2018): iterative FGSM with a momentum of L1-normalised gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, ce_loss, input_grad, project_linf


@dataclass
class MIM(Attack):
    """``g <- decay * g + grad / ||grad||_1`` (per image), ``x <- clip_eps(x + alpha * sign(g))``, from ``x``.

    Dong et al. use ``alpha = eps / steps`` with 10 iterations and ``decay = 1.0``; ``alpha=None`` means that.
    """

    eps: float = 0.3
    alpha: float | None = None
    steps: int = 10
    decay: float = 1.0
    name = "mim"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha if self.alpha is not None else self.eps / self.steps
        x_adv = x.clone()
        momentum = torch.zeros_like(x)
        for _ in range(self.steps):
            grad = input_grad(lambda v: ce_loss(model, v, y), x_adv)
            l1 = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            momentum = self.decay * momentum + grad / l1
            x_adv = project_linf(x_adv + alpha * momentum.sign(), x, self.eps)
        return x_adv
