"""Feature Squeezing (Xu, Evans & Qi, NDSS 2018): a baseline adversarial-example detector.

The classifier's softmax on an input is compared with its softmax on "squeezed" versions of the same input;
the score is the largest L1 distance over the squeezers, and the input is flagged when the score exceeds a
threshold set on clean held-out images for a target false-positive rate.

Squeezers, as in the paper's best joint settings:

* MNIST (the default here): 1-bit depth reduction and a 2x2 median filter.
* ImageNet (RGB): 5-bit depth reduction and a 2x2 median filter (``bit_depth=5, median_sizes=(2,)``; the
  paper's third ImageNet squeezer, non-local means, is not included).

The median filter is vectorised with :func:`torch.nn.functional.unfold` and reproduces
``scipy.ndimage.median_filter(x, size=(1, 1, k, k), mode="reflect")`` exactly, which is what the authors'
code uses: for an even window the window covers offsets ``[-k//2, k - k//2 - 1]`` and the median is the
upper middle value (rank ``k*k // 2``), not the mean of the two middle values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def reduce_bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise [0, 1] pixels to ``2**bits`` levels: ``round(x * (2**bits - 1)) / (2**bits - 1)``."""
    if bits < 1:
        raise ValueError(f"bit depth must be >= 1, got {bits}")
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _symmetric_pad_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices that pad an axis of length ``n`` like numpy's "symmetric" / scipy's "reflect" (d c b a | a b c d)."""
    idx = torch.arange(-before, n + after, device=device)
    period = 2 * n
    idx = idx % period
    return torch.where(idx >= n, period - 1 - idx, idx)


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel ``size`` x ``size`` median filter of a batch (N, C, H, W), vectorised with ``unfold``.

    Matches ``scipy.ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")``: half-sample
    symmetric padding, window offsets ``-size//2 .. size - size//2 - 1`` and the element of rank
    ``size*size // 2`` (the upper median for even windows).
    """
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"median size must be >= 1, got {size}")
    if size == 1:
        return x.clone()
    n, c, h, w = x.shape
    before, after = size // 2, size - size // 2 - 1
    rows = _symmetric_pad_index(h, before, after, x.device)
    cols = _symmetric_pad_index(w, before, after, x.device)
    padded = x[:, :, rows][:, :, :, cols]
    if size == 2:  # rank 2 of 4 (the second largest), elementwise: no unfold, no sort
        a, b = padded[:, :, :-1, :-1], padded[:, :, :-1, 1:]
        c_, d = padded[:, :, 1:, :-1], padded[:, :, 1:, 1:]
        hi1, lo1, hi2, lo2 = torch.maximum(a, b), torch.minimum(a, b), torch.maximum(c_, d), torch.minimum(c_, d)
        return torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2))
    padded = padded.reshape(n * c, 1, h + size - 1, w + size - 1)
    patches = F.unfold(padded, kernel_size=size)  # (N*C, size*size, H*W)
    rank = size * size // 2
    med = patches.sort(dim=1).values[:, rank]
    return med.reshape(n, c, h, w)


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
