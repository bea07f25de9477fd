"""Carlini-Wagner L0 (Carlini & Wagner, 2017): the L2 attack on a shrinking set of free pixels, batched.

Each image keeps a mask of pixels the attack may change (all of them at first). A round runs the CW-L2
objective ``||x_adv - x||_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` with Adam for ``steps`` iterations,
only the free pixels being variables (tanh change of variables, warm-started from the previous round). If the
round fools the model, its result is kept and the free set is shrunk: pixels the solution did not use
(change below 1e-3) are fixed, then the free pixels with the smallest ``|grad f| * |delta|`` (CW's score,
summed over channels) are fixed so that at most ``shrink`` of them remain (at least one is always fixed).
If it fails, ``c`` is multiplied by ``const_factor`` and the round is retried with the same set; once
``c`` passes ``max_const`` the image is finished with its last success. The loop stops after ``rounds``.

The output changes at most ``max_pixels`` pixel locations (all channels of a location count as one pixel):
an image whose smallest successful set is still larger than that is cut to the ``max_pixels`` locations of
largest change (and is then usually not adversarial). Images never fooled are returned unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack, cw_loss, margin
from evaluation.attacks.cw_l2 import from_tanh_space, to_tanh_space


def keep_top(scores: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` (N, P): a mask of the ``counts[i]`` highest scores among ``keep[i]``."""
    scores = scores.masked_fill(~keep, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return keep & (ranks < counts[:, None])


@dataclass
class CWL0(Attack):
    """Untargeted CW-L0 with a hard bound: at most ``max_pixels`` changed pixel locations per image.

    ``kappa``: confidence; ``c``: initial constant; ``steps``: Adam iterations per round; ``rounds``: maximum
    number of rounds; ``shrink``: fraction of the free pixels kept after a successful round; ``lr``: Adam
    step in tanh space; ``const_factor`` / ``max_const``: escalation of ``c`` after a failed round.
    """

    max_pixels: int = 60
    kappa: float = 0.0
    c: float = 10.0
    steps: int = 30
    first_steps: int = 100
    rounds: int = 30
    shrink: float = 0.8
    lr: float = 0.1
    const_factor: float = 10.0
    max_const: float = 100.0
    name = "cw-l0"

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, _, h, wd = x.shape
        dev = x.device
        free = torch.ones(n, h * wd, dtype=torch.bool, device=dev)
        last_ok_free = free.clone()
        last_ok_score = torch.zeros(n, h * wd, device=dev)
        shrink = torch.full((n,), float(self.shrink), device=dev)
        active = torch.ones(n, dtype=torch.bool, device=dev)
        ever_ok = torch.zeros(n, dtype=torch.bool, device=dev)
        const = torch.full((n,), float(self.c), device=dev)
        best_adv = x.clone()
        w_all = to_tanh_space(x)
        for r in range(self.rounds):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xs, ys, fr, cs = x[idx], y[idx], free[idx], const[idx]
            steps = self.steps if r else self.first_steps
            found, ok, w_end = self._round(model, xs, ys, w_all[idx], fr, cs, steps)
            w_all[idx] = w_end
            # CW's score of each free pixel at the solution: |grad of the loss| x |change|, summed over channels.
            delta = (found - xs).abs().sum(1).flatten(1)
            probe = found.detach().requires_grad_(True)
            with torch.enable_grad():
                f = cw_loss(model(probe), ys, self.kappa).sum()
                (g,) = torch.autograd.grad(f, [probe])
            score = g.abs().sum(1).flatten(1) * delta
            used = fr & (delta > 1e-3)
            # Success: keep the result, fix the unused pixels and the lowest-scoring share of the used ones.
            ok_free = torch.where(ok[:, None], used, last_ok_free[idx])
            ok_score = torch.where(ok[:, None], score, last_ok_score[idx])
            # Failure at the largest constant: go back to the last successful set and fix fewer pixels.
            give_up = ~ok & (cs * self.const_factor > self.max_const)
            sh = torch.where(give_up, 1 - (1 - shrink[idx]) / 2, shrink[idx])
            count = ok_free.sum(1)
            target = (count.float() * sh).floor().long()
            stuck = give_up & (target >= count)  # cannot fix even one pixel fewer: this image is finished
            target = torch.minimum(target, count - 1).clamp(min=0)
            shrunk = keep_top(ok_score, ok_free, target)
            retry = ~ok & ~give_up
            best_adv[idx] = torch.where(ok.view(-1, 1, 1, 1), found, best_adv[idx])
            last_ok_free[idx], last_ok_score[idx] = ok_free, ok_score
            free[idx] = torch.where(retry[:, None], fr, shrunk)
            shrink[idx] = sh
            const[idx] = torch.where(retry, cs * self.const_factor, torch.where(give_up, float(self.c), cs))
            ever_ok[idx] |= ok
            # Images never fooled with every pixel free are hopeless; finished images stop.
            active[idx] = ~stuck & (ever_ok[idx] | retry) & (free[idx].sum(1) > 0)
        # Enforce the bound: keep only the max_pixels locations of largest change.
        change = (best_adv - x).abs().sum(1).flatten(1)
        limit = torch.full((n,), self.max_pixels, dtype=torch.long, device=dev)
        allowed = keep_top(change, change > 0, limit)
        return torch.where(allowed.view(n, 1, h, wd), best_adv, x)

    def _round(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        w0: torch.Tensor,
        free: torch.Tensor,
        const: torch.Tensor,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One CW-L2 run on the free pixels: (smallest-L2 success or x, success flags, final variables)."""
        mask = free.view(x.shape[0], 1, x.shape[2], x.shape[3])
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        best_l2 = torch.full((x.shape[0],), float("inf"), device=x.device)
        found = x.clone()
        for it in range(steps + 1):
            with torch.enable_grad():
                adv = torch.where(mask, from_tanh_space(w), x)
                logits = model(adv)
                l2 = (adv - x).pow(2).flatten(1).sum(1)
                loss = (l2 + const * cw_loss(logits, y, self.kappa)).sum()
            with torch.no_grad():
                better = (margin(logits, y) < -self.kappa) & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                found = torch.where(better.view(-1, 1, 1, 1), adv, found)
            if it == steps:
                break
            (w.grad,) = torch.autograd.grad(loss, [w])
            opt.step()
        return found.detach(), torch.isfinite(best_l2), w.detach()
