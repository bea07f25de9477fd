"""One registry of the per-image signals a detector can measure, behind one decorator, :func:`register`.

A signal is defined in one place: its name, which tail of its clean distribution is unusual (``upper`` or
``two-sided``: calibration reads it from here), its parameters (a frozen dataclass, or none), and how it is
computed from one batch. Two stages compute signals, as the Serve deployments split the work:

- ``maps``: from the softmax outputs and explanation maps of the 2N images (originals, then their NLM-denoised
  copies) alone, on the CPU after explanation. They are cheap and always measured, so every verdict carries
  them (the paper's entropies among them).
- ``model``: they need the model once more (a filtered copy classified again, a forward hook), so they run in
  the explanation stage, and only when the :class:`pipeline.DetectorConfig` names them.

Why each signal exists, and on which validation split it was chosen: docs/method.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.entropy import map_entropy, map_shift
from pipeline.filters import median_filter
from pipeline.inputs import to_uint8_hwc
from pipeline.occlude import occlude_top_relevance
from pipeline.transplant import transplant_gain

TAILS = ("upper", "two-sided")
STAGES = ("maps", "model")


@dataclass
class MapsPass:
    """What a ``maps`` signal sees of one batch: softmax outputs (2N, K) and maps (2N, C, H, W), originals first."""

    probs: np.ndarray
    maps: torch.Tensor
    entropy: str

    @property
    def n(self) -> int:
        return len(self.probs) // 2

    @cached_property
    def entropies(self) -> np.ndarray:
        """The entropy (bits, ``entropy`` variant) of all 2N maps, computed once for the signals that share it."""
        return map_entropy(self.maps, self.entropy).numpy().astype(np.float64)


@dataclass
class ModelPass:
    """What a ``model`` signal sees of one batch, inside the explanation stage.

    ``x``: the originals, float32 (N, C, H, W) in [0, 1]; ``both``: originals then denoised copies on the model's
    device (channels-last); ``probs``: their softmax outputs (2N, K) on the device; ``maps``: the attribution maps
    (2N, C', H, W); ``hosts``: the transplant's clean hosts and their softmax outputs on the device, None before a
    calibration picked them; ``captured``: per signal, what its :attr:`Signal.hook` kept of the prediction pass."""

    model: Any  # pipeline.models.TargetModel
    x: np.ndarray
    both: torch.Tensor
    probs: torch.Tensor
    maps: np.ndarray
    hosts: Callable[[], tuple[torch.Tensor, torch.Tensor] | None]
    captured: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.x)

    @cached_property
    def original_probs(self) -> np.ndarray:
        """The originals' softmax outputs (N, K) as float32 numpy (the signals compare against these)."""
        return self.probs.cpu().numpy()[: self.n]

    def classify(self, x: torch.Tensor) -> np.ndarray:
        """Softmax outputs (M, K) of ``x`` (on the device), one inference-only pass."""
        with torch.inference_mode():
            return torch.softmax(self.model.net(x.contiguous(memory_format=torch.channels_last)).float(), dim=1
                                 ).cpu().numpy()

    def shift_to(self, probs: np.ndarray) -> np.ndarray:
        """(N,) L1 distance between the originals' softmax outputs and ``probs`` (N, K)."""
        return np.abs(self.original_probs - probs).sum(1).astype(np.float64)


@dataclass(frozen=True)
class Signal:
    """One registered signal (see the module docstring). ``compute(batch, params)`` returns (N,) float64 values
    of the originals, or None when it cannot be measured yet (the transplant before calibration). ``hook``
    (``model`` signals only): a context manager factory ``hook(model)`` entered around the prediction pass,
    whose value reaches ``compute`` as ``batch.captured[name]``; a hooked signal serialises explanations on the
    model's lock."""

    name: str
    tails: str
    stage: str
    compute: Callable[..., np.ndarray | None]
    params: type | None = None
    hook: Callable[[Any], AbstractContextManager] | None = None
    doc: str = ""
    passes: Callable[[Any], int] | int = 0
    fit: Callable[[np.ndarray, Any], dict] | None = None
    apply: Callable[[np.ndarray, dict], np.ndarray] | None = None

    @property
    def fitted(self) -> bool:
        """A fitted signal's ``compute`` returns (N, D) per-image vectors; calibration fits a state on clean
        images' vectors (``fit(vectors, params)``, kept in the calibration) and ``apply(vectors, state)`` turns
        vectors into the (N,) values scored."""
        return self.fit is not None

    def forward_passes(self, params: object = None) -> int:
        """Inference-only forward passes per image this signal adds to the explanation's (a filtered copy
        classified again: 1; the transplant: one per host): what the bench's floor must run too."""
        return self.passes(self.make_params(params)) if callable(self.passes) else self.passes

    def make_params(self, given: object = None) -> object:
        """This signal's parameters from ``given`` (None, a dict of fields, or an instance); None if it has none."""
        if self.params is None:
            if given not in (None, {}):
                raise ValueError(f"signal {self.name!r} takes no parameters, got {given!r}")
            return None
        if isinstance(given, self.params):
            return given
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"parameters of signal {self.name!r} must be a mapping, got {given!r}")
        try:
            return self.params(**(given or {}))
        except TypeError as e:
            raise ValueError(f"signal {self.name!r}: {e}") from None


SIGNALS: dict[str, Signal] = {}


def register(name: str, *, tails: str, stage: str, params: type | None = None,
             hook: Callable[[Any], AbstractContextManager] | None = None,
             passes: Callable[[Any], int] | int = 0, fit: Callable | None = None,
             apply: Callable | None = None) -> Callable:
    """Register the decorated ``compute(batch, params)`` as the signal ``name``. ``passes``: the inference-only
    forward passes per image it adds (a number, or a function of its parameters); ``fit``/``apply``: a fitted
    signal's (:attr:`Signal.fitted`)."""
    if (fit is None) != (apply is None):
        raise ValueError(f"signal {name!r}: a fitted signal needs both fit and apply")
    if tails not in TAILS or stage not in STAGES:
        raise ValueError(f"signal {name!r}: tails must be one of {TAILS} and stage one of {STAGES}")

    def wrap(fn: Callable) -> Callable:
        SIGNALS[name] = Signal(name, tails, stage, fn, params, hook, (fn.__doc__ or "").strip(), passes, fit, apply)
        return fn

    return wrap


def signal(name: str) -> Signal:
    """The registered signal ``name``; a clear error naming the known ones otherwise."""
    if name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}; choose from {', '.join(SIGNALS)}")
    return SIGNALS[name]


# -- parameters -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MedianParams:
    """Side of the square median filter (2: Feature Squeezing's 2×2 for MNIST)."""

    size: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 2:
            raise ValueError(f"median_shift: size must be an integer >= 2, got {self.size!r}")


@dataclass(frozen=True)
class ImpulseParams:
    """The ``top`` largest residuals against a ``size`` × ``size`` median filter are summed."""

    size: int = 3
    top: int = 5

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and self.size >= 2 and isinstance(self.top, int) and self.top >= 1):
            raise ValueError(f"impulse_residual: size must be an integer >= 2 and top >= 1, got {self.size!r} and "
                             f"{self.top!r}")


@dataclass(frozen=True)
class OcclusionParams:
    """Fraction of the original's map inpainted before it is classified again."""

    fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"occlusion_shift: fraction must be in (0, 1), got {self.fraction!r}")


@dataclass(frozen=True)
class TransplantParams:
    """Fraction of the original's map pasted onto each of ``hosts`` clean host images."""

    fraction: float = 0.15
    hosts: int = 8

    def __post_init__(self) -> None:
        if not (0.0 < self.fraction < 1.0 and isinstance(self.hosts, int) and self.hosts >= 1):
            raise ValueError(f"transplant_gain pastes a fraction in (0, 1) of each map onto at least one host, got "
                             f"fraction={self.fraction!r} and hosts={self.hosts!r}")


@dataclass(frozen=True)
class NoiseParams:
    """``copies`` copies of the original with Gaussian noise of standard deviation ``sigma`` (on [0, 1] pixels)
    are classified again."""

    sigma: float = 0.03
    copies: int = 4

    def __post_init__(self) -> None:
        if not (0.0 < self.sigma < 1.0 and isinstance(self.copies, int) and self.copies >= 1):
            raise ValueError(f"noise_shift: sigma must be in (0, 1) and copies an integer >= 1, got "
                             f"{self.sigma!r} and {self.copies!r}")


@dataclass(frozen=True)
class ChromaParams:
    """Chroma high-pass energy is averaged over ``block`` × ``block`` blocks; the ``quantile`` of the blocks
    (the flattest ones) is the value."""

    block: int = 16
    quantile: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.block, int) and self.block >= 4 and 0.0 <= self.quantile <= 1.0):
            raise ValueError(f"chroma_residual: block must be an integer >= 4 and quantile in [0, 1], got "
                             f"{self.block!r} and {self.quantile!r}")


@dataclass(frozen=True)
class FeatureParams:
    """The clean photos' pooled features are modelled by a Gaussian in their top ``components`` principal
    axes."""

    components: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.components, int) and self.components >= 1):
            raise ValueError(f"feature_distance: components must be an integer >= 1, got {self.components!r}")


# -- maps: from the 2N predictions and maps -------------------------------------------------------------------


@register("entropy_original", tails="two-sided", stage="maps")
def _entropy_original(batch: MapsPass, params: None) -> np.ndarray:
    """Entropy of the original's explanation map (the paper's H(original))."""
    return batch.entropies[: batch.n]


@register("entropy_denoised", tails="two-sided", stage="maps")
def _entropy_denoised(batch: MapsPass, params: None) -> np.ndarray:
    """Entropy of the denoised copy's explanation map (the paper's H(denoised))."""
    return batch.entropies[batch.n :]


@register("entropy_change", tails="two-sided", stage="maps")
def _entropy_change(batch: MapsPass, params: None) -> np.ndarray:
    """H(denoised) - H(original): the paper's own signal (its sign rule flags a change >= 0)."""
    return batch.entropies[batch.n :] - batch.entropies[: batch.n]


@register("prediction_shift", tails="upper", stage="maps")
def _prediction_shift(batch: MapsPass, params: None) -> np.ndarray:
    """L1 distance between the softmax outputs of the original and its denoised copy."""
    n = batch.n
    return np.abs(batch.probs[:n] - batch.probs[n:]).sum(1).astype(np.float64)


@register("map_shift", tails="upper", stage="maps")
def _map_shift(batch: MapsPass, params: None) -> np.ndarray:
    """Total-variation distance between the relevance distributions of the two maps (where relevance moved)."""
    n = batch.n
    return map_shift(batch.maps[:n], batch.maps[n:]).numpy().astype(np.float64)


# -- model: one more look with the model ---------------------------------------------------------------------


@register("median_shift", tails="upper", stage="model", params=MedianParams, passes=1)
def _median_shift(batch: ModelPass, params: MedianParams) -> np.ndarray:
    """L1 shift of the softmax when the original is median-filtered: a second denoiser, for the few saturated
    pixels of an L0 attack that NLM keeps."""
    return batch.shift_to(batch.classify(median_filter(batch.both[: batch.n], params.size)))


@register("noise_shift", tails="upper", stage="model", params=NoiseParams, passes=lambda params: params.copies)
def _noise_shift(batch: ModelPass, params: NoiseParams) -> np.ndarray:
    """Mean L1 shift of the softmax over noisy copies of the original: an adversarial example placed just past
    the decision boundary (BIM stopped at its first success, PGD at a small budget) falls back under small
    random noise, which a clean photo, well inside its class, shrugs off (Hu et al. 2019; Roth et al. 2019). The
    noise is one fixed draw per copy, the same for every image, so a verdict does not depend on its batch."""
    x = batch.both[: batch.n].float()
    gen = torch.Generator().manual_seed(0)
    noise = (params.sigma * torch.randn((params.copies, *x.shape[1:]), generator=gen)).to(x.device)
    noisy = (x[None] + noise[:, None]).clamp(0.0, 1.0).reshape(-1, *x.shape[1:])
    probs = batch.classify(noisy).reshape(params.copies, batch.n, -1)
    return np.abs(batch.original_probs[None] - probs).sum(2).mean(0).astype(np.float64)


@register("denoise_residual", tails="upper", stage="model")
def _denoise_residual(batch: ModelPass, params: None) -> np.ndarray:
    """Mean absolute pixel change NLM made to the original: an L∞ attack spreads noise over the whole image
    (a digit's empty background among it), which NLM removes, while a clean image comes back nearly unchanged.
    It needs no model pass; it runs in the explanation stage, where the pixels are."""
    n = batch.n
    return (batch.both[:n].float() - batch.both[n:].float()).abs().mean(dim=(1, 2, 3)).cpu().numpy().astype(
        np.float64)


@register("impulse_residual", tails="upper", stage="model", params=ImpulseParams)
def _impulse_residual(batch: ModelPass, params: ImpulseParams) -> np.ndarray:
    """Sum of the ``top`` largest pixel residuals against a median filter: an L0 attack (CW-L0) sets a few
    isolated pixels to an extreme, which a median filter removes outright, while a clean stroke's pixels sit
    among neighbours like them. No model pass."""
    x = batch.both[: batch.n].float()
    residual = (x - median_filter(x, params.size)).abs().flatten(1)
    return residual.topk(min(params.top, residual.shape[1]), dim=1).values.sum(1).cpu().numpy().astype(np.float64)


@register("occlusion_shift", tails="two-sided", stage="model", params=OcclusionParams, passes=1)
def _occlusion_shift(batch: ModelPass, params: OcclusionParams) -> np.ndarray:
    """L1 shift of the softmax when the most relevant region of the original is inpainted (SentiNet's first
    test): it sees a patch, which NLM cannot remove; a patch raises it, BIM lowers it."""
    occluded = occlude_top_relevance(to_uint8_hwc(batch.x), batch.maps[: batch.n], params.fraction)
    xo = torch.from_numpy(occluded).permute(0, 3, 1, 2).to(batch.both.device).float() / 255
    with torch.inference_mode():
        probs = torch.softmax(batch.model.net(xo).float(), dim=1).cpu().numpy()
    return batch.shift_to(probs)


@contextmanager
def first_output(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives ``layer``'s output of the first forward pass run inside the block (detached): the
    prediction pass, not the passes Captum runs after it."""
    seen: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        if not seen:
            seen.append(output.detach())

    handle = layer.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def hooked_batch(batch: ModelPass, name: str) -> torch.Tensor:
    """The originals' part of what signal ``name``'s hook kept of this batch's prediction pass."""
    seen = batch.captured[name]
    if not seen or len(seen[0]) != 2 * batch.n:  # another caller's pass, or none: never score a foreign tensor
        raise RuntimeError("the Grad-CAM layer's hook did not see this batch's prediction pass")
    return seen[0][: batch.n]


def pooled_activation_norm(activations: torch.Tensor) -> np.ndarray:
    """The L2 norm over channels of each channel's spatial maximum of (N, C, h, w) activations."""
    return activations.float().amax(dim=(2, 3)).norm(dim=1).cpu().numpy()


@register("activation_norm", tails="upper", stage="model", hook=lambda model: first_output(model.gradcam_layer))
def _activation_norm(batch: ModelPass, params: None) -> np.ndarray:
    """How hard the original drives the Grad-CAM layer's features at their strongest, read from the prediction
    pass itself (no extra pass): a patch and iterative L∞ attacks drive them beyond clean photos."""
    return pooled_activation_norm(hooked_batch(batch, "activation_norm")).astype(np.float64)


def fit_gaussian(vectors: np.ndarray, params: FeatureParams) -> dict:
    """The clean vectors' mean, top principal axes and their variances (a Gaussian in that subspace)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < 2:
        raise ValueError("feature_distance needs at least 2 clean images to fit")
    mean = vectors.mean(0)
    _, sv, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    k = min(params.components, len(sv))
    var = np.maximum(sv[:k] ** 2 / (len(vectors) - 1), 1e-12)
    return {"mean": mean.astype(np.float32).tolist(), "axes": vt[:k].astype(np.float32).tolist(),
            "variance": var.tolist()}


def gaussian_distance(vectors: np.ndarray, state: dict) -> np.ndarray:
    """Mahalanobis distance of each vector to the fitted Gaussian, in its principal subspace."""
    z = (np.asarray(vectors, dtype=np.float64) - np.asarray(state["mean"])) @ np.asarray(state["axes"]).T
    return np.sqrt((z**2 / np.asarray(state["variance"])).sum(1))


@register("feature_distance", tails="upper", stage="model", params=FeatureParams,
          hook=lambda model: first_output(model.gradcam_layer), fit=fit_gaussian, apply=gaussian_distance)
def _feature_distance(batch: ModelPass, params: FeatureParams) -> np.ndarray:
    """How far the original's pooled Grad-CAM-layer features lie from clean photos' (a Mahalanobis distance to a
    Gaussian fitted on the calibration's clean photos, in its top principal axes; Lee et al. 2018 fit one per
    class, which a few hundred clean photos of a thousand classes cannot): an L∞ attack drives a photo's deep
    features off the clean ones even at 2/255. Read from the prediction pass (no extra pass)."""
    return hooked_batch(batch, "feature_distance").float().mean(dim=(2, 3)).cpu().numpy()


# OpenCV's RGB -> YCrCb chroma rows (on 0..255 values): the Cr and Cb differences from luma
_CHROMA = torch.tensor([[0.5, -0.418688, -0.081312], [-0.168736, -0.331264, 0.5]])
_HIGH_PASS = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


@register("chroma_residual", tails="upper", stage="model", params=ChromaParams)
def _chroma_residual(batch: ModelPass, params: ChromaParams) -> np.ndarray:
    """High-frequency colour energy in the original's flattest blocks: a camera or a JPEG encoder keeps colour
    smooth (chroma is subsampled), while a gradient attack moves each channel on its own, everywhere, a flat sky
    among it (the frequency artefact of the perturbation). The Cr and Cb planes are high-passed with
    Immerkær's 3 × 3 noise mask, averaged over blocks, and the ``quantile`` of the blocks taken. Its clean level
    depends on how a source encodes colour: calibrate on the cameras it guards. No model pass."""
    x = batch.both[: batch.n].float() * 255.0
    if x.shape[1] != 3:
        raise ValueError("chroma_residual reads colour photos; this model takes one channel")
    chroma = torch.einsum("kc,nchw->nkhw", _CHROMA.to(x.device), x)
    kernel = _HIGH_PASS.to(x.device).expand(2, 1, 3, 3)
    energy = torch.nn.functional.conv2d(chroma, kernel, groups=2).abs().sum(1, keepdim=True)
    blocks = torch.nn.functional.avg_pool2d(energy, params.block).flatten(1)
    return torch.quantile(blocks, params.quantile, dim=1).cpu().numpy().astype(np.float64)


@register("transplant_gain", tails="upper", stage="model", params=TransplantParams,
          passes=lambda params: params.hosts)
def _transplant_gain(batch: ModelPass, params: TransplantParams) -> np.ndarray | None:
    """Mean rise in clean hosts' probability of the original's class when its most relevant region is pasted
    onto them (SentiNet's second test): a universal patch carries its class with it. None without hosts."""
    hosts = batch.hosts()
    if hosts is None:
        return None
    return transplant_gain(batch.model.net, batch.both[: batch.n], batch.probs[: batch.n].argmax(1),
                           batch.maps[: batch.n], hosts[0], hosts[1], params.fraction)
