"""MagNet (Meng & Chen, CCS 2017): a baseline adversarial-example detector (and reformer) for MNIST.

Two denoising autoencoders are trained on clean digits (``scripts/train_magnet.py``), with the structures of
the authors' MNIST setup (all 3x3 convolutions, "same" padding, sigmoid activations):

* autoencoder I:  conv(3)-avgpool-conv(3) | conv(3)-upsample-conv(3) | conv(1)
* autoencoder II: conv(3) | conv(3) | conv(1)

Detectors (each flags an input whose score exceeds its own threshold):

* ``recon_I``:  mean squared reconstruction error of autoencoder I (the paper's L2 detector, ``p=2``),
* ``recon_II``: mean absolute reconstruction error of autoencoder II (the paper's L1 detector, ``p=1``),
* ``jsd_T10``, ``jsd_T40``: Jensen-Shannon divergence between ``softmax(logits / T)`` of the input and of its
  autoencoder-I reconstruction (the paper's probability-divergence detectors, used there for CIFAR-10).

As in the authors' code, the reconstruction error is ``mean(|x - ae(x)|**p)`` over pixels (no p-th root).
The combined detector flags an input when any detector fires. :meth:`MagNet.calibrate` splits the
false-positive budget evenly over the detectors (per-detector threshold = the ``1 - target_fpr / n`` quantile
of clean calibration scores), measures the combined FPR on the calibration set and, with ``adjust=True``
(the default), raises the common per-detector budget by bisection so that the combined calibration FPR is as
close to the target as possible without exceeding it (the detectors are correlated, so the even split alone
lands below the target). The reformer (autoencoder I) is available as :meth:`MagNet.reform` and
:meth:`MagNet.classify_reformed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.mnist import load_weights

ASSETS = Path(__file__).resolve().parent.parent / "assets"
AE1_WEIGHTS = ASSETS / "magnet_ae1.pt"
AE2_WEIGHTS = ASSETS / "magnet_ae2.pt"

DETECTOR_NAMES = ("recon_I", "recon_II", "jsd_T10", "jsd_T40")


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 "same" convolution with Keras' default initialisation (Glorot-uniform weights, zero bias), as in the
    authors' Keras code; PyTorch's default initialisation trains these sigmoid networks much more slowly."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class MagNetAE(nn.Module):
    """MagNet's denoising autoencoder, built from a structure list like the authors' ``[3, "average", 3]``.

    The encoder is the structure in order (int = 3x3 conv with that many channels + sigmoid, "average" =
    2x2 average pooling); the decoder mirrors it (pooling -> 2x upsampling); a final 3x3 conv back to the
    image channels with a sigmoid gives an image in [0, 1]. ``forward`` returns the reconstruction;
    ``forward_with_activations`` also returns every conv activation (for the L2 activity regulariser).
    """

    def __init__(self, structure: Sequence[int | str], channels: int = 1) -> None:
        super().__init__()
        self.structure = list(structure)
        layers: list[nn.Module] = []
        c = channels
        for decoding, items in ((False, list(structure)), (True, list(reversed(structure)))):
            for item in items:
                if isinstance(item, int):
                    layers += [_conv(c, item), nn.Sigmoid()]
                    c = item
                elif item == "average":
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest") if decoding else nn.AvgPool2d(2))
                else:
                    raise ValueError(f"unknown structure item {item!r}")
        layers += [_conv(c, channels), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        acts = []
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.Sigmoid):
                acts.append(x)
        return x, acts


def autoencoder_I(channels: int = 1) -> MagNetAE:  # noqa: N802 (the paper's name)
    """MagNet's MNIST autoencoder I (detector I and the reformer): structure ``[3, "average", 3]``."""
    return MagNetAE([3, "average", 3], channels)


def autoencoder_II(channels: int = 1) -> MagNetAE:  # noqa: N802 (the paper's name)
    """MagNet's MNIST autoencoder II (detector II): structure ``[3]``."""
    return MagNetAE([3], channels)


def load_autoencoder(kind: str, weights: str | Path | None = None) -> MagNetAE:
    """Autoencoder ``"I"`` or ``"II"`` with the shipped (or given) weights, loaded strictly, in eval mode."""
    builders = {"I": (autoencoder_I, AE1_WEIGHTS), "II": (autoencoder_II, AE2_WEIGHTS)}
    if kind not in builders:
        raise ValueError(f"unknown autoencoder {kind!r}; choose 'I' or 'II'")
    build, default = builders[kind]
    return load_weights(build(), weights or default, "MagNet", "scripts/train_magnet.py")


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (natural log) between probability vectors of shape (N, K)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), 0.0).sum(1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


class MagNet:
    """MagNet's detectors (and reformer) around a classifier on [0, 1] MNIST images returning logits.

    ``MagNet.from_pretrained()`` uses the shipped MNIST CNN and autoencoders. ``detectors`` picks which of
    :data:`DETECTOR_NAMES` take part (all four by default). Call :meth:`calibrate` on clean held-out images
    before :meth:`detect`.
    """

    def __init__(
        self,
        model: nn.Module,
        ae1: MagNetAE,
        ae2: MagNetAE,
        detectors: Sequence[str] = DETECTOR_NAMES,
        batch_size: int = 500,
    ) -> None:
        unknown = set(detectors) - set(DETECTOR_NAMES)
        if unknown or not detectors:
            raise ValueError(f"detectors must be a non-empty subset of {DETECTOR_NAMES}, got {list(detectors)}")
        self.net = getattr(model, "net", model)  # a TargetModel or a bare nn.Module
        self.ae1 = ae1.eval()
        self.ae2 = ae2.eval()
        self.detectors = tuple(detectors)
        self.batch_size = batch_size
        self.thresholds: dict[str, float] | None = None
        self.calibration: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | None = None,
        ae1_weights: str | Path | None = None,
        ae2_weights: str | Path | None = None,
        **kwargs,
    ) -> MagNet:
        """The shipped autoencoders (``evaluation/assets/magnet_ae{1,2}.pt``) around ``model`` (default: the
        shipped MNIST CNN)."""
        if model is None:
            from pipeline.models import load_model

            model = load_model("mnist")
        return cls(model, load_autoencoder("I", ae1_weights), load_autoencoder("II", ae2_weights), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.ae1.parameters()).device

    def to(self, device: str | torch.device) -> MagNet:
        self.net.to(device)
        self.ae1.to(device)
        self.ae2.to(device)
        return self

    def _batches(self, x: torch.Tensor):
        for i in range(0, len(x), self.batch_size):
            yield x[i : i + self.batch_size].to(self.device, torch.float32)

    # --- reformer -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def reform(self, x: torch.Tensor) -> torch.Tensor:
        """The reformer: autoencoder I's reconstruction of ``x`` (N, 1, 28, 28), on ``x``'s device."""
        return torch.cat([self.ae1(xb) for xb in self._batches(x)]).to(x.device) if len(x) else x.clone()

    @torch.inference_mode()
    def classify_reformed(self, x: torch.Tensor) -> np.ndarray:
        """Predicted labels (N,) of the classifier on the reformed inputs (MagNet's defended classifier)."""
        preds = [self.net(self.ae1(xb)).argmax(1).cpu().numpy() for xb in self._batches(x)]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)

    # --- detectors ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score_all(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Every active detector's score (N,), higher = more suspicious."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.detectors}
        for xb in self._batches(x):
            rec1 = self.ae1(xb)
            if "recon_I" in out:
                out["recon_I"].append((xb - rec1).pow(2).mean((1, 2, 3)).cpu().numpy())
            if "recon_II" in out:
                out["recon_II"].append((xb - self.ae2(xb)).abs().mean((1, 2, 3)).cpu().numpy())
            if any(name.startswith("jsd") for name in out):
                logits_x, logits_r = self.net(xb), self.net(rec1)
                for name in out:
                    if name.startswith("jsd_T"):
                        t = float(name[len("jsd_T"):])
                        p, q = F.softmax(logits_x / t, dim=1), F.softmax(logits_r / t, dim=1)
                        out[name].append(jensen_shannon(p, q).cpu().numpy())
        return {name: np.concatenate(v) if v else np.zeros(0) for name, v in out.items()}

    def _combined(self, scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> np.ndarray:
        return np.max(np.stack([scores[n] / thresholds[n] for n in self.detectors]), axis=0)

    def score(self, x: torch.Tensor) -> np.ndarray:
        """Combined score (N,): max over detectors of score / threshold; > 1 exactly when some detector fires.

        Needs :meth:`calibrate` (the thresholds put the detectors on a common scale)."""
        if self.thresholds is None:
            raise RuntimeError("call calibrate() on clean images before score() or detect()")
        return self._combined(self.score_all(x), self.thresholds)

    def calibrate(self, clean_x: torch.Tensor, target_fpr: float = 0.05, adjust: bool = True) -> dict[str, float]:
        """Per-detector thresholds from clean held-out images for a combined false-positive rate ~ ``target_fpr``.

        The budget is split evenly (each threshold is the ``1 - target_fpr / n`` quantile of its clean
        scores); the combined FPR on ``clean_x`` is then measured and, with ``adjust``, the common
        per-detector budget is raised by bisection until the combined calibration FPR is as close to
        ``target_fpr`` as possible without exceeding it. ``self.calibration`` records both FPRs.
        """
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        scores = self.score_all(clean_x)
        n = len(self.detectors)

        def thresholds_for(per_detector: float) -> dict[str, float]:
            return {d: float(np.quantile(scores[d], 1 - per_detector)) for d in self.detectors}

        def combined_fpr(th: dict[str, float]) -> float:
            return float((self._combined(scores, th) > 1).mean())

        even = target_fpr / n
        thresholds = thresholds_for(even)
        even_fpr = combined_fpr(thresholds)
        per_detector = even
        if adjust and n > 1 and even_fpr < target_fpr:
            lo, hi = even, target_fpr  # combined FPR at lo <= target; at hi (one detector alone) >= target
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if combined_fpr(thresholds_for(mid)) <= target_fpr:
                    lo = mid
                else:
                    hi = mid
            per_detector = lo
            thresholds = thresholds_for(per_detector)
        self.thresholds = thresholds
        self.calibration = {
            "target_fpr": target_fpr,
            "even_split_per_detector_fpr": even,
            "even_split_combined_fpr": even_fpr,
            "per_detector_fpr": per_detector,
            "combined_fpr": combined_fpr(thresholds),
            "n_calibration": len(clean_x),
        }
        return dict(thresholds)

    def detect(self, x: torch.Tensor) -> np.ndarray:
        """Boolean (N,) array: True where any detector's score exceeds its threshold."""
        return self.score(x) > 1.0

    def detect_all(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Per detector, a boolean (N,) array of where it fires."""
        if self.thresholds is None:
            raise RuntimeError("call calibrate() on clean images before detect_all()")
        return {name: s > self.thresholds[name] for name, s in self.score_all(x).items()}
