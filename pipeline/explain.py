"""One registry of Captum attribution methods behind one batch-first function, :func:`explain`.

Every method takes a float batch (N, C, H, W) in [0, 1] and the target class per image, and returns maps of
the input's shape. Baselines are black images (the paper's choice for IG). Costs, in forward+backward passes
per image: saliency 1, DeepLift ~1, Grad-CAM 1 (back to the last block only), guided Grad-CAM 2, IG ``steps``,
gradient SHAP ``samples``, SmoothGrad ``samples`` x the inner method's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from captum.attr import (
    DeepLift,
    GradientShap,
    GuidedGradCam,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Saliency,
)
from torch import nn


@dataclass(frozen=True)
class ExplainParams:
    """Knobs shared by the methods: IG ``steps``, ``samples`` for SHAP/SmoothGrad, noise ``stdev`` (pixel
    units), and ``internal_batch_size`` (rows per forward pass; None = the whole expanded batch at once)."""

    steps: int = 4
    samples: int = 8
    stdev: float = 0.1
    internal_batch_size: int | None = None


Method = Callable[[nn.Module, torch.Tensor, torch.Tensor, ExplainParams, nn.Module | None], torch.Tensor]
METHODS: dict[str, Method] = {}
METHOD_COST: dict[str, Callable[[ExplainParams], int]] = {}


def register(name: str, cost: Callable[[ExplainParams], int]) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        METHOD_COST[name] = cost
        return fn

    return wrap


@register("ig", cost=lambda p: p.steps)
def _ig(model, x, target, p, layer):
    return IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=p.steps,
        internal_batch_size=p.internal_batch_size,
    )


@register("deeplift", cost=lambda p: 1)
def _deeplift(model, x, target, p, layer):
    return DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=target)


@register("gradient_shap", cost=lambda p: p.samples)
def _gradient_shap(model, x, target, p, layer):
    baselines = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0]) * x.mean()])
    return GradientShap(model).attribute(x, baselines=baselines, n_samples=p.samples, stdevs=p.stdev, target=target)


@register("saliency", cost=lambda p: 1)
def _saliency(model, x, target, p, layer):
    return Saliency(model).attribute(x, target=target, abs=False)


@register("guided_gradcam", cost=lambda p: 2)
def _guided_gradcam(model, x, target, p, layer):
    if layer is None:
        raise ValueError("guided_gradcam needs the model's Grad-CAM layer")
    return GuidedGradCam(model, layer).attribute(x, target=target)


@register("gradcam", cost=lambda p: 1)
def _gradcam(model, x, target, p, layer):
    """Grad-CAM of the last convolutional block (ReLU'd), upsampled bilinearly to the input size. It reads the
    gradient at that block, not at the input, so it still sees a region whose early units are saturated (an
    adversarial patch on ReLU6 networks), where input gradients vanish."""
    if layer is None:
        raise ValueError("gradcam needs the model's Grad-CAM layer")
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")


@register("smoothgrad_ig", cost=lambda p: p.samples * p.steps)
def _smoothgrad_ig(model, x, target, p, layer):
    return NoiseTunnel(IntegratedGradients(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=p.samples, stdevs=p.stdev, baselines=torch.zeros_like(x),
        target=target, n_steps=p.steps, internal_batch_size=p.internal_batch_size,
    )


@register("smoothgrad", cost=lambda p: p.samples)
def _smoothgrad(model, x, target, p, layer):
    return NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=p.samples, stdevs=p.stdev, target=target, abs=False
    )


def explain(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    method: str = "ig",
    params: ExplainParams = ExplainParams(),
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Attribution maps for a whole batch in one Captum call; same shape as ``x``.

    ``target``: the class to explain per row (the detector passes the class predicted on the original image,
    for the denoised copy too, so both maps explain the same decision).
    """
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    x = x.detach().requires_grad_(True)
    attr = METHODS[method](model, x, target, params, layer)
    return attr.detach()


# Methods that only take gradients at the input: they touch no module state, so two threads may run them on one
# model at once. Every other method (DeepLift hooks the non-linearities, Grad-CAM its layer, guided backprop every
# ReLU) registers module hooks while ``attribute`` runs, which would fire on another thread's forward pass; an
# allow-list, so that a method added later is serialised until it is known to be safe.
GRADIENT_ONLY_METHODS = frozenset({"saliency", "ig", "gradient_shap", "smoothgrad", "smoothgrad_ig"})


def passes_per_image(method: str, params: ExplainParams = ExplainParams()) -> int:
    """Forward+backward passes one map of ``method`` costs: the floor a benchmark compares against."""
    return METHOD_COST[method](params)


def predict_and_explain(
    model: nn.Module,
    both: torch.Tensor,
    n: int,
    method: str,
    params: ExplainParams = ExplainParams(),
    layer: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs and maps for ``both`` = N originals then N denoised copies, all maps explaining the
    class predicted on the original.

    For saliency the map is the gradient of the target logit at the input, so the forward pass that predicts
    the class is the one the gradient flows back through: one forward and one backward per image, the floor.
    (Captum's ``Saliency`` runs its own forward after ours; the result is the same, which a test checks.)
    Every other method predicts under ``inference_mode`` and then makes one Captum call for all 2N maps.
    """
    if method == "saliency":
        x = both.detach().requires_grad_(True)
        logits = model(x)
        pred = logits[:n].detach().argmax(1)
        chosen = logits.gather(1, torch.cat([pred, pred])[:, None]).sum()
        (grad,) = torch.autograd.grad(chosen, x)
        return torch.softmax(logits.detach().float(), dim=1), grad.detach()
    with torch.inference_mode():
        probs = torch.softmax(model(both).float(), dim=1)
    pred = probs[:n].argmax(1)
    return probs, explain(model, both, torch.cat([pred, pred]), method, params, layer)
