"""Square Attack, L∞ (Andriushchenko et al., ECCV 2020): a score-based black-box attack, batched.

It reads only the model's output scores, never a gradient, so it tests a detector against an attacker who
cannot differentiate through the model (or whose gradients are masked). Its perturbations look unlike the
gradient attacks' too: blocks of ±eps, never a pixel-by-pixel pattern.

The algorithm, as in the authors' code: start from vertical stripes of ±eps (one random sign per column and
channel); then at each iteration, for each image not yet misclassified, pick a random square window whose side
follows the schedule of :func:`square_fraction`, set it to ±eps (one random sign per channel) and keep the
change if the margin loss ``z_y - max_{j != y} z_j`` (on the logits) decreased. Once an image is misclassified
it is frozen and costs no more queries. Every image stays in the L∞ ball of radius ``eps`` and in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, margin

# The authors' schedule: at these fractions (in ten-thousandths) of the query budget, the share of the image a
# square covers halves. It is written for 10,000 queries and rescaled to the actual budget.
HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, it: int, n_queries: int) -> float:
    """The share ``p`` of the image the square covers at iteration ``it`` of ``n_queries`` (the paper's
    piecewise-constant schedule: ``p_init`` halved at each of :data:`HALVING_POINTS`, rescaled)."""
    t = int(it / n_queries * 10_000)
    halvings = sum(t > point for point in HALVING_POINTS)
    return p_init / 2**halvings


def square_side(p: float, h: int, w: int) -> int:
    """Side of a square covering a share ``p`` of an ``h`` x ``w`` image, at least 1 and at most
    ``min(h, w) - 1`` (so that there are at least two positions in each direction)."""
    return min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)


@dataclass
class SquareAttack(Attack):
    """Untargeted L∞ Square Attack: ``eps`` ball radius, ``n_queries`` model evaluations per image at most
    (the stripe initialisation counts as one), ``p_init`` initial share of the image a square covers, ``seed``
    of the generator that draws stripes, positions and signs (each call starts it afresh, so equal inputs give
    equal outputs).

    ``levels``: the pixel levels of the images' encoding (255 for uint8). The step ``±eps`` is rounded down to a
    whole number of levels (0.3 becomes 76/255), so that adversarials made from uint8 images lie exactly on the
    uint8 grid: the images the model scored are the ones delivered. With ``±eps`` itself, a pixel at ``k/255``
    lands between two levels (76.5/255 away at 0.3), and rounding to uint8 afterwards moves some of the images
    the attack froze just past the decision boundary back across it. ``levels=0`` uses ``eps`` unrounded.

    MNIST defaults: the paper's MNIST setting ``eps = 0.3``, ``p_init = 0.8``, with a budget of 1,000 queries
    (the schedule of ``p`` rescales to it).

    After a call, ``last_queries`` holds the queries spent on each image (int64, (N,)). The model runs under
    ``torch.no_grad``: no gradient is ever computed. :meth:`loss` is what each query reads; a subclass may read
    more of the answer (a detector's score beside the model's: evaluation.query_attacks).
    """

    eps: float = 0.3
    n_queries: int = 1000
    p_init: float = 0.8
    seed: int = 0
    levels: int = 255
    name = "square"

    def __post_init__(self) -> None:
        self.last_queries: torch.Tensor | None = None

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._search(model, x, y)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The loss of one query per image (``index``: which of the attacked images each row is); below 0 is a
        success, which freezes the image: the margin ``z_y - max_{j != y} z_j`` of the logits."""
        return margin(model(x), y)

    def _search(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        n, c, h, w = x.shape
        step = math.floor(self.eps * self.levels + 1e-6) / self.levels if self.levels > 0 else self.eps

        def random_signs(*shape: int) -> torch.Tensor:
            """``±step`` uniformly, drawn on the CPU generator (reproducible on any device)."""
            signs = torch.randint(0, 2, shape, generator=gen).mul_(2).sub_(1)
            return signs.to(device=x.device, dtype=x.dtype) * step

        x_best = (x + random_signs(n, c, 1, w)).clamp(0.0, 1.0)
        loss_best = self.loss(model, x_best, y, torch.arange(n, device=x.device))
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)

        for it in range(self.n_queries - 1):
            active = torch.nonzero(loss_best >= 0).flatten()
            if active.numel() == 0:
                break
            m = active.numel()
            x_cur, x_old = x[active], x_best[active]
            side = square_side(square_fraction(self.p_init, it, self.n_queries), h, w)
            top = torch.randint(0, h - side, (m,), generator=gen).to(x.device)
            left = torch.randint(0, w - side, (m,), generator=gen).to(x.device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (m, 1, h, w)

            # A square that leaves the window as it is wastes a query: flip its signs (the authors redraw until
            # something changes; with one channel that is the same thing, and flipping always changes it).
            signs = random_signs(m, c, 1, 1)
            same = ((x_cur + signs).clamp(0.0, 1.0) == x_old) | ~window
            signs = torch.where(same.flatten(1).all(1)[:, None, None, None], -signs, signs)
            x_new = torch.where(window, (x_cur + signs).clamp(0.0, 1.0), x_old)

            loss = self.loss(model, x_new, y[active], active)
            better = loss < loss_best[active]
            x_best[active] = torch.where(better[:, None, None, None], x_new, x_old)
            loss_best[active] = torch.where(better, loss, loss_best[active])
            queries[active] += 1

        self.last_queries = queries
        return x_best
