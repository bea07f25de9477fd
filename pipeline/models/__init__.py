"""Target models, each with its own preprocessing, behind one loader.

A :class:`TargetModel` takes float images in [0, 1] (N, C, H, W) at the model's resolution and returns logits;
normalisation lives inside it, so attributions and attacks are in pixel space. ``prepare`` maps uint8 images of
any size to the model's resolution (resize 256 / centre-crop 224 for ImageNet), still uint8, so that denoising
sees the pixels the model sees.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models.imagenet import GRADCAM_LAYERS, load_imagenet_net
from pipeline.models.mnist import MnistNet, load_mnist_net
from pipeline.models.source import MODEL_NAMES, ModelSource, load_network, parse_model_ref

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the most pixels a photo may have once resized to its short side, before the centre crop: a thin strip of a few
# KB on the wire would otherwise become hundreds of MB; 4M allows panoramas up to 64:1
MAX_RESIZED_PIXELS = 4 * 1024 * 1024


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, as the first layer of the model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class TargetModel:
    """A classifier on [0,1] pixels plus what the pipeline needs to know about it."""

    name: str
    net: nn.Module
    channels: int
    size: int
    gradcam_layer: nn.Module | None  # the layer Grad-CAM and the activation norm read; None: those are refused
    resize_to: int | None = None
    # how the network is loaded again (a bundle records it); None: a module built in Python with no factory named
    source: ModelSource | None = field(default=None, repr=False, compare=False)
    # what a bundle records besides the network: the normalisation inside ``net`` and the explained layer's name
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    explain_layer: str | None = None
    # held while Captum has hooks on ``net`` (pipeline.explain.GRADIENT_ONLY_METHODS says which methods need none):
    # the hooks would fire on another thread's forward pass, so such calls on one model run one at a time, whichever
    # Detector makes them
    hooks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) at any size -> uint8 (N, size, size, C) as the model expects.

        Photos are resized (short side ``resize_to``) and centre-cropped, as torchvision preprocesses them; one so
        elongated that the resized image would exceed ``MAX_RESIZED_PIXELS`` is refused (see there). An image
        already at the model's input size passes through untouched: it has been prepared upstream (a camera
        pipeline, or an adversarial made at the model's resolution), and resizing it again would change the
        pixels being judged."""
        if self.resize_to is None:
            return images
        import cv2

        out = np.empty((len(images), self.size, self.size, self.channels), dtype=np.uint8)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            if (h, w) == (self.size, self.size):
                out[i] = img.reshape(self.size, self.size, -1)
                continue
            self.check_size(h, w)
            nh, nw = self._resized(h, w)
            shrink = min(h, w) > self.resize_to
            resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            out[i] = resized[top : top + self.size, left : left + self.size].reshape(self.size, self.size, -1)
        return out

    def _resized(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of an H×W photo resized to the short side ``resize_to``, before the centre crop."""
        scale = self.resize_to / min(h, w)
        return max(self.size, round(h * scale)), max(self.size, round(w * scale))

    def check_size(self, h: int, w: int) -> None:
        """Raise :class:`InputError` unless an H×W image can be prepared: a model that does not resize takes
        exactly ``size``×``size``; one that resizes refuses only what would resize to over ``MAX_RESIZED_PIXELS``."""
        if self.resize_to is None:
            if (h, w) != (self.size, self.size):
                raise InputError(f"wrong image size: {self.name} takes {self.size}×{self.size}, got {h}×{w}")
            return
        nh, nw = self._resized(h, w)
        if (h, w) != (self.size, self.size) and nh * nw > MAX_RESIZED_PIXELS:
            raise InputError(f"image of {w}×{h} pixels too elongated: resized to a short side of {self.resize_to} "
                             f"it would be {nw}×{nh} pixels before the centre crop (limit {MAX_RESIZED_PIXELS})")

    def to(self, device: str | torch.device) -> TargetModel:
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def hookable(self) -> bool:
        """Whether Python hooks on its layers fire (not in an exported program or a TorchScript module)."""
        return self.source is None or self.source.hookable


def load_model(
    name: str = "mnist", weights: str | Path | None = None, random_init: bool = False
) -> TargetModel:
    """Load a target model by name: ``mnist`` (shipped weights), ``resnet18`` or ``mobilenet_v2``.

    Weights are kept channels-last: oneDNN's convolutions run forward and backward faster in that layout on
    CPU (``explainer bench`` reports both layouts' floors, reports/bench). The detector feeds channels-last
    batches; results are the same numbers either way."""
    source = ModelSource("builtin", name, str(weights) if weights else None)
    if name == "mnist":
        net = load_mnist_net(weights).to(memory_format=torch.channels_last)
        return TargetModel("mnist", net, channels=1, size=28, gradcam_layer=net.gradcam_layer, source=source)
    if name in ("resnet18", "mobilenet_v2"):
        backbone = load_imagenet_net(name, weights, random_init=random_init)
        net = nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), backbone).eval()
        net = net.to(memory_format=torch.channels_last)
        layer = backbone.get_submodule(GRADCAM_LAYERS[name])
        return TargetModel(name, net, channels=3, size=224, gradcam_layer=layer, resize_to=256, source=source,
                           normalize=(IMAGENET_MEAN, IMAGENET_STD), explain_layer=GRADCAM_LAYERS[name])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _layer_name(net: nn.Module, layer: str | nn.Module | None) -> str | None:
    """The dotted name of the layer to explain: as given, the name of the module given, or else the network's
    last ``Conv2d`` (the usual Grad-CAM layer); None when it has none."""
    if isinstance(layer, str):
        try:
            net.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"explain_layer {layer!r}: the network has no such submodule") from None
        return layer
    named = list(net.named_modules())
    if layer is not None:
        for name, module in named:
            if module is layer:
                return name
        raise ValueError("explain_layer is not a submodule of the network")
    convs = [name for name, module in named if isinstance(module, nn.Conv2d)]
    return convs[-1] if convs else None


def wrap_network(
    net: nn.Module, *, name: str, input_size: int, channels: int,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None, explain_layer: str | nn.Module | None = None,
    resize_to: int | None = None, source: ModelSource | None = None,
) -> TargetModel:
    """A user's classifier as a :class:`TargetModel`: images in [0, 1], ``normalize`` = (mean, std) per channel
    applied inside the model when given, ``input_size`` square at ``channels`` channels, photos resized to the
    short side ``resize_to`` and centre-cropped when set. ``explain_layer``: the layer Grad-CAM explains (default:
    the last ``Conv2d``); ignored for an exported or TorchScript network, whose layers run no hooks."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    if not 8 <= input_size <= 4096:
        raise ValueError(f"input_size must be 8..4096 pixels, got {input_size}")
    if resize_to is not None and resize_to < input_size:
        raise ValueError(f"resize_to ({resize_to}) must be at least input_size ({input_size})")
    if normalize is not None:
        mean, std = (tuple(float(v) for v in part) for part in normalize)
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"normalize needs {channels} means and {channels} positive stds, got {normalize}")
        normalize = (mean, std)
    hookable = source is None or source.hookable
    if not hookable and explain_layer is not None:
        raise ValueError(f"explain_layer: a {source.kind} network runs as one compiled graph whose layers fire no "
                         "hooks, so no layer can be explained; give module:callable to use one")
    layer_name = _layer_name(net, explain_layer) if hookable else None
    layer = net.get_submodule(layer_name) if layer_name is not None else None
    model = net if normalize is None else nn.Sequential(Normalize(*normalize), net)
    if hookable:  # an exported program refuses eval() (it was exported in the mode it runs in)
        model = model.eval()
    try:
        model = model.to(memory_format=torch.channels_last)
    except (RuntimeError, NotImplementedError):  # a compiled graph keeps its own layout
        pass
    return TargetModel(name, model, channels=channels, size=input_size, gradcam_layer=layer, resize_to=resize_to,
                       source=source, normalize=normalize, explain_layer=layer_name)


__all__ = ["MODEL_NAMES", "MnistNet", "ModelSource", "Normalize", "TargetModel", "load_model", "load_mnist_net",
           "load_network", "parse_model_ref", "wrap_network"]
