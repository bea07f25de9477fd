"""BIM / I-FGSM (Kurakin et al., 2017): iterated FGSM with clipping, starting at the clean image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, ce_loss, input_grad, project_linf


@dataclass
class BIM(Attack):
    """``steps`` steps of ``alpha * sign(grad CE)`` from ``x`` (no random start), each clipped to the ``eps``
    L∞ ball and [0, 1]. ``steps=0`` picks Kurakin's count ``min(255 * eps + 4, 1.25 * 255 * eps)``.

    ``early_stop``: freeze each image at the first step that makes the model misclassify it. The adversarial
    then sits just past the decision boundary, at low confidence, as CW's κ = 0 does. It is the attacker who
    spends no more than needed; a detector that sees only how far an attack overshoots misses it.
    """

    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 40
    early_stop: bool = False
    name = "bim"

    @property
    def n_steps(self) -> int:
        if self.steps > 0:
            return self.steps
        return int(math.ceil(min(255 * self.eps + 4, 1.25 * 255 * self.eps)))

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.n_steps):
            grad = input_grad(lambda v: ce_loss(model, v, y), x_adv)
            stepped = project_linf(x_adv + self.alpha * grad.sign(), x, self.eps)
            if not self.early_stop:
                x_adv = stepped
                continue
            x_adv = torch.where(active[:, None, None, None], stepped, x_adv)
            with torch.no_grad():
                active &= model(x_adv).argmax(1) == y
            if not active.any():
                break
        return x_adv
