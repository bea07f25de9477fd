"""The shared base of the attacks: input checks, eval mode, input gradients, projections, CW losses.

Every attack is a small object built with its hyperparameters; ``attack(model, x, y)`` (or
``attack.forward(model, x, y)``) returns adversarial images for a batch. Subclasses implement ``_forward``;
:meth:`Attack.forward` checks the inputs, puts the model in eval mode for the duration (restoring its mode
afterwards) and detaches and clamps the result. Gradients are taken with :func:`torch.autograd.grad` with
respect to the input (or the attack's own variables) only, so nothing ever accumulates in the model
parameters' ``.grad`` and their ``requires_grad`` flags are never touched (safe with a shared model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (dropout off, batch-norm statistics frozen), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Gradient of the scalar ``loss_fn(x)`` with respect to ``x`` alone (never the model's parameters)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, [x])
    return grad.detach()


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (summed, so that each image's gradient does not depend on the batch size)."""
    return F.cross_entropy(model(x), y, reduction="sum")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image ``z_y - max_{j != y} z_j``: positive while the label wins, negative once misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return true - others.amax(1)


def cw_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Carlini-Wagner's untargeted f6 per image: ``max(z_y - max_{j != y} z_j, -kappa)``."""
    return margin(logits, y).clamp(min=-kappa)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L∞ ball of radius ``eps`` around ``x`` intersected with the [0, 1] box."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def random_linf_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A uniform random point of the L∞ ball around ``x`` (clipped to [0, 1])."""
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)


class Attack:
    """Base class: hyperparameters in the constructor, ``forward(model, x, y) -> x_adv`` on [0, 1] pixels.

    ``x`` is float (N, C, H, W) in [0, 1], ``y`` int64 (N,) true labels (untargeted attacks move away from
    them). The returned tensor has the shape, dtype and device of ``x``, lies in [0, 1] and is detached.
    """

    name = "attack"

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not torch.is_floating_point(x):
            raise ValueError(f"{self.name}: expected float images (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name}: expected labels (N,) for {x.shape[0]} images, got {tuple(y.shape)}")
        x = x.detach().clamp(0.0, 1.0)
        y = y.detach().to(device=x.device, dtype=torch.long)
        if x.shape[0] == 0:
            return x.clone()
        with eval_mode(model):
            x_adv = self._forward(model, x, y)
        return x_adv.detach().clamp(0.0, 1.0).to(x.dtype)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(model, x, y)

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, object]:
        """The hyperparameters, for reports."""
        if is_dataclass(self):
            return asdict(self)
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
