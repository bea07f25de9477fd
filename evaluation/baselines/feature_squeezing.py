"""Feature Squeezing (Xu, Evans & Qi, NDSS 2018): a baseline adversarial-example detector.

The classifier's softmax on an input is compared with its softmax on "squeezed" versions of the same input;
the score is the largest L1 distance over the squeezers, and the input is flagged when the score exceeds a
threshold set on clean held-out images for a target false-positive rate.

Squeezers, as in the paper's best joint settings:

* MNIST (the default here): 1-bit depth reduction and a 2x2 median filter.
* ImageNet (RGB): 5-bit depth reduction and a 2x2 median filter (``bit_depth=5, median_sizes=(2,)``; the
  paper's third ImageNet squeezer, non-local means, is not included).

The median filter is the core's :func:`pipeline.filters.median_filter` (the same filter the ``median_shift``
signal runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.filters import median_filter


def reduce_bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise [0, 1] pixels to ``2**bits`` levels: ``round(x * (2**bits - 1)) / (2**bits - 1)``."""
    if bits < 1:
        raise ValueError(f"bit depth must be >= 1, got {bits}")
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


class FeatureSqueezing:
    """Feature-squeezing detector around a classifier on [0, 1] images (N, C, H, W) returning logits.

    ``FeatureSqueezing(net)`` is the MNIST setting (1-bit depth, 2x2 median);
    ``FeatureSqueezing(net, bit_depth=5, median_sizes=(2,))`` the ImageNet one. ``bit_depth=None`` or an empty
    ``median_sizes`` leaves that squeezer out. Call :meth:`calibrate` on clean held-out images before
    :meth:`detect`.
    """

    def __init__(
        self,
        model: nn.Module,
        bit_depth: int | None = 1,
        median_sizes: Sequence[int] = (2,),
        batch_size: int = 256,
    ) -> None:
        self.net = getattr(model, "net", model)  # a TargetModel or a bare nn.Module
        self.squeezers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if bit_depth is not None:
            self.squeezers[f"bit_depth_{bit_depth}"] = lambda x, b=bit_depth: reduce_bit_depth(x, b)
        for k in median_sizes:
            self.squeezers[f"median_{k}x{k}"] = lambda x, k=k: median_filter(x, k)
        if not self.squeezers:
            raise ValueError("at least one squeezer is needed")
        self.batch_size = batch_size
        self.threshold: float | None = None
        self.target_fpr: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _batches(self, x: torch.Tensor):
        for i in range(0, len(x), self.batch_size):
            yield x[i : i + self.batch_size].to(self.device, torch.float32)

    @torch.inference_mode()
    def score_all(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Per squeezer, the L1 distance between softmax(net(x)) and softmax(net(squeeze(x))), shape (N,)."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.squeezers}
        for xb in self._batches(x):
            p = F.softmax(self.net(xb), dim=1)
            for name, squeeze in self.squeezers.items():
                q = F.softmax(self.net(squeeze(xb)), dim=1)
                out[name].append((p - q).abs().sum(1).cpu().numpy())
        return {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}

    def score(self, x: torch.Tensor) -> np.ndarray:
        """The detection score: max over squeezers of the L1 softmax distance, shape (N,); higher = suspicious."""
        return np.max(np.stack(list(self.score_all(x).values())), axis=0)

    def calibrate(self, clean_x: torch.Tensor, target_fpr: float = 0.05) -> float:
        """Set the threshold to the (1 - target_fpr) quantile of the scores of clean held-out images."""
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        scores = self.score(clean_x)
        self.threshold = float(np.quantile(scores, 1 - target_fpr))
        self.target_fpr = target_fpr
        return self.threshold

    def detect(self, x: torch.Tensor) -> np.ndarray:
        """Boolean (N,) array: True where the score exceeds the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError("call calibrate() on clean images before detect()")
        return self.score(x) > self.threshold
