"""Adversarial patch (Brown et al., 2017): one universal, targeted patch pasted anywhere in the image.

:meth:`AdversarialPatch.fit` trains the patch by expectation over transformations: for each step a batch of
training images gets the patch pasted at a uniformly random position (optionally rescaled by a random factor
in ``scale`` and rotated by a random angle in ``[-rotation, rotation]`` degrees), and Adam raises the
log-probability of ``target_class`` averaged over the batch; the patch is kept in [0, 1]. :meth:`forward`
pastes the trained patch at a random position of each image (with the same random transformations), so
only the pixels inside the pasted square's bounding box can change. It works at any resolution (e.g.
``patch_size=50`` on 224 x 224 RGB is about 5% of the image; ``patch_size=12`` on MNIST about 18%).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attacks.base import Attack, eval_mode


class AdversarialPatch(Attack):
    """A square patch of ``patch_size`` pixels pushed towards ``target_class``.

    ``steps``/``lr``/``batch_size``: training defaults for :meth:`fit`; ``scale``: (min, max) random
    rescaling of the patch side; ``rotation``: maximum random rotation in degrees (0 keeps the patch
    axis-aligned and pasted pixel for pixel); ``seed``: generator seed for placements and initialisation.
    """

    name = "patch"

    def __init__(
        self,
        patch_size: int = 12,
        target_class: int = 8,
        steps: int = 500,
        lr: float = 0.1,
        batch_size: int = 64,
        scale: tuple[float, float] = (1.0, 1.0),
        rotation: float = 0.0,
        seed: int = 0,
    ) -> None:
        if patch_size < 1:
            raise ValueError("patch_size must be positive")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError("scale must be (min, max) with 0 < min <= max")
        self.patch_size = patch_size
        self.target_class = target_class
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotation = float(rotation)
        self.seed = seed
        self.patch: torch.Tensor | None = None
        self.last_boxes: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def params(self) -> dict[str, object]:
        keys = ("patch_size", "target_class", "steps", "lr", "batch_size", "scale", "rotation", "seed")
        return {k: getattr(self, k) for k in keys}

    @property
    def box_size(self) -> int:
        """Side of the square that holds the transformed patch (the only region that can change)."""
        side = self.patch_size * self.scale[1]
        if self.rotation > 0:
            side *= math.sqrt(2)
        return math.ceil(side)

    def _rand(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self._gen).to(device)

    def _transformed(self, patch: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` randomly scaled/rotated copies of ``patch`` and their masks, each (n, C, B, B)."""
        c = patch.shape[0]
        if self.scale == (1.0, 1.0) and self.rotation == 0:
            return patch.expand(n, -1, -1, -1), torch.ones(n, 1, self.patch_size, self.patch_size, device=patch.device)
        b = self.box_size
        dev = patch.device
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * self._rand(n, dev)
        angle = torch.deg2rad((2 * self._rand(n, dev) - 1) * self.rotation)
        # Box coordinates (normalised to the box) -> patch coordinates (normalised to the patch).
        k = b / (self.patch_size * s)
        cos, sin = torch.cos(angle) * k, torch.sin(angle) * k
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, [n, c, b, b], align_corners=False)
        ones = torch.ones(1, 1, self.patch_size, self.patch_size, device=dev)
        src = torch.cat([patch.unsqueeze(0), ones], 1).expand(n, -1, -1, -1)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out[:, :c], out[:, c:]

    def apply(self, x: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """Paste ``patch`` (default: the trained one) at a random position of every image of ``x``.

        The chosen boxes (top, left, side) are left in ``self.last_boxes``. Differentiable in ``patch``.
        """
        patch = self.patch if patch is None else patch
        if patch is None:
            raise RuntimeError("the patch is not trained: call fit() first")
        n, c, h, w = x.shape
        if patch.shape[0] != c:
            raise ValueError(f"patch has {patch.shape[0]} channels, images have {c}")
        box, mask = self._transformed(patch.to(x.device), n)
        b = box.shape[-1]
        if b > min(h, w):
            raise ValueError(f"patch box {b} does not fit in {h}x{w} images")
        top = (self._rand(n, x.device) * (h - b + 1)).long().clamp(max=h - b)
        left = (self._rand(n, x.device) * (w - b + 1)).long().clamp(max=w - b)
        rows = (top[:, None] + torch.arange(b, device=x.device))[:, :, None]  # (n, b, 1)
        cols = (left[:, None] + torch.arange(b, device=x.device))[:, None, :]  # (n, 1, b)
        batch = torch.arange(n, device=x.device)[:, None, None]
        canvas = x.new_zeros(n, c, h, w)
        cover = x.new_zeros(n, 1, h, w)
        canvas[batch, :, rows, cols] = box.permute(0, 2, 3, 1)
        cover[batch, :, rows, cols] = mask.permute(0, 2, 3, 1)
        self.last_boxes = torch.stack([top, left, torch.full_like(top, b)], 1)
        return x * (1 - cover) + canvas * cover

    def fit(
        self,
        model: nn.Module,
        images: torch.Tensor,
        target_class: int | None = None,
        steps: int | None = None,
    ) -> AdversarialPatch:
        """Train the universal patch on ``images`` (float (N, C, H, W) in [0, 1]) towards ``target_class``."""
        if target_class is not None:
            self.target_class = target_class
        steps = self.steps if steps is None else steps
        images = images.detach().clamp(0, 1)
        n, c = images.shape[:2]
        init = torch.rand(c, self.patch_size, self.patch_size, generator=self._gen).to(images.device)
        patch = init.requires_grad_(True)
        opt = torch.optim.Adam([patch], lr=self.lr)
        with eval_mode(model):
            for _ in range(steps):
                pick = torch.randint(n, (min(self.batch_size, n),), generator=self._gen).to(images.device)
                with torch.enable_grad():
                    logits = model(self.apply(images[pick], patch))
                    target = torch.full((len(pick),), self.target_class, device=images.device)
                    loss = F.cross_entropy(logits, target)
                    (patch.grad,) = torch.autograd.grad(loss, [patch])
                opt.step()
                with torch.no_grad():
                    patch.clamp_(0, 1)
        self.patch = patch.detach()
        return self

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            warnings.warn("AdversarialPatch used before fit(): training it on the batch being attacked", stacklevel=3)
            self.fit(model, x)
        with torch.no_grad():
            return self.apply(x)
