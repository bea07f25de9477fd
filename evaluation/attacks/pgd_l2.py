"""L2 PGD (Madry et al., 2018): projected normalised-gradient ascent on the cross-entropy inside an L2 ball.

The L∞ attacks move every pixel by the same amount; an L2 budget lets the attacker spend it where the gradient
is large, which gives the detector differently shaped perturbations (fewer pixels changed, more strongly). The
steps follow torchattacks' ``PGDL2``: each image's gradient is scaled to unit L2 norm, the step is taken, the
perturbation is scaled back into the ball and the pixels clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, ce_loss, input_grad

TINY = 1e-12  # guards the divisions by a norm that is zero (a zero gradient, or no perturbation yet)


def per_image_l2(t: torch.Tensor) -> torch.Tensor:
    """Each image's L2 norm, shaped (N, 1, 1, 1) to broadcast against (N, C, H, W)."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each perturbation ``x_adv - x`` into the L2 ball of radius ``eps``, then clip the pixels to [0, 1].

    Clipping moves every pixel towards ``x`` (which lies in [0, 1]), so it can only shrink the perturbation: the
    result lies in the ball and in the box. It is the projection used by Madry et al.'s and torchattacks' code,
    not the exact Euclidean projection onto the intersection, which needs an iterative solve.
    """
    delta = x_adv - x
    delta = delta * (eps / per_image_l2(delta).clamp(min=TINY)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_l2_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A random point of the L2 ball around ``x`` (clipped to [0, 1]): a Gaussian direction scaled to a radius
    drawn uniformly in [0, eps], as torchattacks' ``PGDL2`` does (denser near the centre than uniform in volume,
    which in 784 dimensions would put nearly every start on the sphere)."""
    direction = torch.randn_like(x)
    direction = direction / per_image_l2(direction).clamp(min=TINY)
    radius = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * eps
    return (x + radius * direction).clamp(0.0, 1.0)


@dataclass
class PGDL2(Attack):
    """L2 PGD: optional random start in the ball, then ``steps`` steps of ``alpha * grad / ||grad||_2`` (per
    image), each projected back onto the ``eps`` L2 ball around ``x`` and [0, 1].

    MNIST defaults: ``eps = 2.0``, the common L2 budget for MNIST in the robustness literature (for scale: it is
    the L2 size of changing 44 pixels by 0.3, or 4 pixels from black to white), with ``alpha = 0.1`` and 50
    steps, so that the steps can cross the ball 2.5 times over and the random start matters little.
    The random start draws from torch's global generator, as :class:`~evaluation.attacks.pgd.PGD` does.
    """

    eps: float = 2.0
    alpha: float = 0.1
    steps: int = 50
    random_start: bool = True
    name = "pgd-l2"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = random_l2_start(x, self.eps) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = input_grad(lambda v: ce_loss(model, v, y), x_adv)
            step = grad / per_image_l2(grad).clamp(min=TINY)
            x_adv = project_l2(x_adv + self.alpha * step, x, self.eps)
        return x_adv
