"""HopSkipJump, L2 (Chen, Jordan and Wainwright, IEEE S&P 2020): a decision-based black-box attack.

It reads only whether an image is adversarial (the top-1 label, or the whole verdict: :meth:`HopSkipJump.decide`),
never a score: the weakest attacker a service meets, and the one that needs the most queries. From an adversarial
starting image it walks the decision boundary towards the original: a binary search along the line between them
lands on the boundary, a Monte Carlo estimate of the boundary's normal (queries around the boundary point, each
answered yes or no) gives a direction, a geometric search finds how far along it the image stays adversarial, and a
new binary search returns to the boundary, closer to the original. Repeat.

Every query is rounded to the uint8 grid before it is asked, as a service receives it; the estimate's probes are
therefore at least ``min_probe`` grey levels (RMS) from the boundary point, where the authors' ``delta`` would
round away to nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from evaluation.attacks.base import Attack


def on_grid(x: torch.Tensor, levels: int = 255) -> torch.Tensor:
    return x.clamp(0, 1).mul(levels).round().div(levels)


@dataclass
class HopSkipJump(Attack):
    """Untargeted L2 HopSkipJump. ``max_queries`` per image; ``init_evals`` / ``max_evals``: the boundary
    estimate's queries at the first iteration, growing as sqrt(iteration); ``min_probe``: the estimate's probe
    radius floor, in grey levels RMS; ``start_tries``: uniform noise images tried for a start when none is given;
    ``grid``: the points the binary and geometric searches ask at once.

    ``forward(model, x, y)`` attacks with the top-1 label as the oracle; :meth:`run` takes a start per image
    (e.g. another class's image the service answers wrongly). After a call, ``last_queries`` holds the queries
    spent per image and ``last_distance`` the L2 distance of each result to its original."""

    max_queries: int = 5000
    init_evals: int = 100
    max_evals: int = 1000
    min_probe: float = 2.0
    start_tries: int = 100
    grid: int = 8
    seed: int = 0
    name = "hop_skip_jump"

    def decide(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        """Whether each query (rows of ``x``, all for attacked image ``index`` of true class ``y``) is
        adversarial: the model's label differs."""
        with torch.no_grad():
            return model(x).argmax(1) != y

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(model, x, y, None)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
        """Attack each image of ``x`` from its ``starts`` row (adversarial; None: draw noise until one is)."""
        gen = torch.Generator().manual_seed(self.seed)
        out = x.clone()
        self.last_queries = torch.zeros(len(x), dtype=torch.long)
        self.last_distance = torch.full((len(x),), float("inf"))
        for i in range(len(x)):
            self._image = i
            self._spent = 0
            result = self._attack_one(model, x[i : i + 1], y[i : i + 1], None if starts is None else starts[i : i + 1],
                                      gen)
            if result is not None:
                out[i] = result[0]
                self.last_distance[i] = float((result - x[i : i + 1]).norm())
            self.last_queries[i] = self._spent
        return out

    def _ask(self, model: nn.Module, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = on_grid(q)
        self._spent += len(q)
        return self.decide(model, q, y.expand(len(q)), self._image)

    def _left(self) -> int:
        return self.max_queries - self._spent

    def _boundary(self, model, x0: torch.Tensor, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Search the segment x0 → adv (adv adversarial) for the boundary down to one grid level: ``grid``
        points at a time, asked together (a service answers a batch as fast as one image), then the interval
        between the last clean and the first adversarial one. The adversarial end, on the grid."""
        lo, hi = 0.0, 1.0
        while self._left() > 0:
            if hi - lo < 1e-4 or torch.equal(on_grid(x0 + lo * (adv - x0)), on_grid(x0 + hi * (adv - x0))):
                break
            ts = torch.linspace(lo, hi, self.grid + 2)[1:-1][: self._left()]
            hits = torch.nonzero(self._ask(model, x0 + ts.view(-1, *([1] * (x0.dim() - 1))) * (adv - x0), y))
            if len(hits) == 0:
                lo = float(ts[-1])
            else:
                j = int(hits[0])
                lo, hi = (float(ts[j - 1]) if j > 0 else lo), float(ts[j])
        return on_grid(x0 + hi * (adv - x0))

    def _step(self, model, adv: torch.Tensor, direction: torch.Tensor, step: float, y: torch.Tensor) -> float:
        """The geometric step search, ``grid`` halvings asked together: the largest step along ``direction``
        that stays adversarial (0 when none down to 1e-4 does)."""
        while step >= 1e-4 and self._left() > 0:
            steps = step / 2 ** torch.arange(self.grid, dtype=torch.float32)[: self._left()]
            hits = torch.nonzero(self._ask(model, adv + steps.view(-1, *([1] * (adv.dim() - 1))) * direction, y))
            if len(hits):
                return float(steps[int(hits[0])])
            step = float(steps[-1]) / 2
        return 0.0

    def _attack_one(self, model, x0, y, start, gen) -> torch.Tensor | None:
        d = x0.numel()
        if start is None:
            for _ in range(self.start_tries):
                noise = torch.rand(x0.shape, generator=gen)
                if self._left() <= 0:
                    return None
                if self._ask(model, noise, y)[0]:
                    start = noise
                    break
            else:
                return None
        elif not self._ask(model, start, y)[0]:
            return None
        adv = self._boundary(model, x0, start, y)
        it = 1
        while self._left() > 0:
            dist = float((adv - x0).norm())
            delta = max(dist / d, self.min_probe / 255 * math.sqrt(d))  # the authors' sqrt(d) * d^-1.5 * dist
            evals = min(int(self.init_evals * math.sqrt(it)), self.max_evals, self._left())
            if evals < 2:
                break
            u = torch.randn((evals, *x0.shape[1:]), generator=gen)
            u = u / u.flatten(1).norm(dim=1).view(-1, *([1] * (u.dim() - 1)))
            phi = self._ask(model, adv + delta * u, y).float() * 2 - 1
            if phi.abs().mean() < 1:  # both answers seen: subtract the baseline
                phi = phi - phi.mean()
            grad = (phi.view(-1, *([1] * (u.dim() - 1))) * u).mean(0, keepdim=True)
            if grad.norm() == 0:
                break
            direction = grad / grad.norm()
            step = self._step(model, adv, direction, dist / math.sqrt(it), y)
            if step == 0.0:
                break
            adv = self._boundary(model, x0, on_grid(adv + step * direction), y)
            it += 1
        return adv
