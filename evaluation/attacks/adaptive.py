"""An adaptive L∞ PGD that knows the detector: it misclassifies and keeps the detector's signals clean-looking.

A defence is only as strong as its best detector-aware attack (Carlini & Wagner 2017, Athalye et al. 2018,
Tramèr et al. 2020). :class:`AdaptivePGD` minimises, per image, the CW margin plus a differentiable copy of every
signal the ``digits`` detector scores: the softmax shifts under NLM (``prediction_shift``) and under the 2×2
median (``median_shift``), the shift of the saliency relevance between the image and its NLM copy
(``map_shift``), what NLM removes (``denoise_residual``) and the largest residuals against a 3×3 median
(``impulse_residual``).

Two parts of the detector have no usable gradient and are crossed as Athalye et al. prescribe:

- OpenCV's NLM by BPDA: the forward value is the real NLM of the uint8-quantised image, the backward pass is
  either the identity (``nlm_grad="identity"``, straight-through) or the gradient of :func:`torch_nlm`, the same
  filter re-implemented in torch (``nlm_grad="nlm"``; it matches OpenCV to within a grey level). The identity
  gives ``x - NLM(x)`` a zero gradient, so only the second lets the attack shape what NLM removes.
- A ReLU network's saliency map has a zero second derivative, so the map term is taken on a copy of the model
  whose ReLUs are Softplus(beta); the prediction terms use the real model.

How the misclassification and the evasion are traded off (a summed loss, or orthogonal steps) and why each
default was chosen: :class:`AdaptivePGD`. :mod:`evaluation.adaptive_sweep` runs it against a detector over a sweep.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attacks.base import Attack, cw_loss, project_linf, random_linf_start
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.entropy import relevance_distribution
from pipeline.filters import median_filter
from pipeline.inputs import to_uint8_hwc
from pipeline.presets import preset

NLM_GRADS = ("identity", "nlm")
STEP_RULES = ("sum", "orthogonal")


def _digits_nlm() -> NLMParams:
    """The NLM of the ``digits`` preset (the shipped MNIST detector's)."""
    return preset("digits").nlm


def nlm_forward(x: torch.Tensor, params: NLMParams) -> torch.Tensor:
    """The detector's NLM copy of float (N, C, H, W) images: uint8-quantised, one ``denoise_batch`` call."""
    out = denoise_batch(to_uint8_hwc(x.detach().cpu().numpy()), params)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2))).to(x.device, x.dtype).div(255)


def torch_nlm(x: torch.Tensor, params: NLMParams) -> torch.Tensor:
    """OpenCV's greyscale ``fastNlMeansDenoising`` in differentiable torch, on (N, 1, H, W) in [0, 1]: each pixel
    is the mean of its ``search`` window weighted by ``exp(-d / h²)``, d the mean squared difference (grey levels)
    of the ``template`` patches, weights under 0.001 dropped, reflect-101 borders, as OpenCV does."""
    t, s = params.template // 2, params.search // 2
    _, _, h, w = x.shape
    padded = F.pad(x * 255, (t + s,) * 4, mode="reflect")
    centre = padded[:, :, s : s + h + 2 * t, s : s + w + 2 * t]
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            other = padded[:, :, dy : dy + h + 2 * t, dx : dx + w + 2 * t]
            weight = torch.exp(-F.avg_pool2d((centre - other) ** 2, params.template, stride=1) / params.h**2)
            weight = torch.where(weight < 1e-3, torch.zeros_like(weight), weight)
            num = num + weight * other[:, :, t : t + h, t : t + w]
            den = den + weight
    return num / den / 255


def bpda_nlm(x: torch.Tensor, params: NLMParams, grad: str = "identity") -> torch.Tensor:
    """The real NLM's value forward (BPDA); backward the identity or the gradient of :func:`torch_nlm`."""
    if grad != "identity" and x.shape[1] != 1:
        raise ValueError("the torch NLM gradient is greyscale only: use nlm_grad='identity' for colour images")
    approx = x if grad == "identity" else torch_nlm(x, params)
    return approx + (nlm_forward(x, params) - approx).detach()


def quantise(v: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``v`` rounded to uint8 levels (what the detector receives), kept in the ``eps`` ball around ``x``, with a
    straight-through gradient."""
    q = v.detach().mul(255).round().div(255)
    q = torch.where(q - x > eps, q - 1 / 255, q)
    q = torch.where(x - q > eps, q + 1 / 255, q)
    return v + (q - v).detach()


def map_tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image total-variation distance between the relevance distributions of two batches of maps (the
    ``map_shift`` signal, differentiable)."""
    return 0.5 * (relevance_distribution(a) - relevance_distribution(b)).abs().sum(1)


def impulse(x: torch.Tensor, size: int, top: int) -> torch.Tensor:
    """Per-image sum of the ``top`` largest |x - median(x)| (the ``impulse_residual`` signal, differentiable)."""
    residual = (x - median_filter(x, size)).abs().flatten(1)
    return residual.topk(min(top, residual.shape[1]), dim=1).values.sum(1)


def softplus_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """A frozen copy of ``model`` with every ``nn.ReLU`` replaced by ``nn.Softplus(beta)``: the same network
    with a smooth gradient, so that a loss on its saliency map can itself be differentiated."""
    smooth = copy.deepcopy(model).eval()
    for name, module in list(smooth.named_modules()):
        if isinstance(module, nn.ReLU):
            parent, _, child = name.rpartition(".")
            setattr(smooth.get_submodule(parent) if parent else smooth, child, nn.Softplus(beta=beta))
    for p in smooth.parameters():
        p.requires_grad_(False)
    return smooth


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input gradient of each row's ``target`` logit, kept in the graph (``create_graph``) to be differentiated."""
    chosen = model(x).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(chosen, x, create_graph=True)
    return grad


@dataclass
class AdaptivePGD(Attack):
    """L∞ PGD (signed steps projected on the ``eps`` ball and [0, 1]) against the classifier and the detector at
    once. Per image it lowers the misclassification loss ``max(margin(f(x)), -kappa)`` and the evasion loss

    ``copy_weight * (max(margin(f(NLM x)), -kappa) + max(margin(f(med x)), -kappa))
    + pred_weight * (|p(x) - p(NLM x)|_1 + |p(x) - p(med x)|_1)
    + map_weight * TV(rel(sal_s(x)), rel(sal_s(NLM x))) + residual_weight * mean|x - NLM x|
    + impulse_weight * top-k |x - med3 x|``

    ``p`` is the real model's softmax; NLM the detector's (``nlm``) through BPDA (``nlm_grad``, module
    docstring); ``med`` the ``median_size`` median filter, differentiated through its own torch op (the gradient
    goes to the pixel each window selects; it is the detector's operation exactly, so it needs no BPDA), as is
    the ``impulse_size`` median of the impulse term (``impulse_top`` residuals); ``sal_s`` the saliency map of
    the class predicted on ``x``, taken with ``create_graph`` on the Softplus(``softplus_beta``) surrogate. A
    weight of 0 drops its term. The margins of the copies matter because the detector reads the prediction
    shifts on a log scale (most clean shifts are below 1e-4): an L1 term alone stops pushing long before that.

    ``step_rule="sum"`` steps along the gradient of the summed loss. ``"orthogonal"`` (Bryniarski et al. 2022)
    steps along the misclassification gradient with its component along the evasion gradient removed until the
    margin reaches ``-kappa``, then along the evasion gradient with its component along the misclassification
    gradient removed: no weight between the two goals to tune, and each step leaves the other goal unchanged to
    first order. On even test digits it fooled every digit and evaded more often than the best summed weighting.

    ``alpha`` decays along a cosine to a tenth (``decay``): constant signed steps leave the image jittering by
    ``alpha`` per pixel, noise that NLM removes and ``denoise_residual`` counts. ``kappa`` (logits) is how far
    past the boundary the image is pushed: small keeps the perturbation, and so the map shift and residual,
    small. ``random_start`` (uniform in the ball) is off: noise on an empty background is what the residual sees,
    and from the clean image the attack evaded more often. ``softplus_beta`` trades fidelity to the ReLU map
    (large) against a smooth second derivative (small). All defaults were chosen on even-indexed test digits.

    Every term is evaluated on the iterate rounded to uint8 (straight-through), the image the detector receives.
    The result is, per image, the misclassified iterate with the lowest total loss, its map term measured on the
    real model (the last iterate if none was misclassified).
    """

    eps: float = 0.3
    alpha: float = 0.02
    steps: int = 200
    random_start: bool = False
    kappa: float = 1.0
    copy_weight: float = 1.0
    pred_weight: float = 1.0
    map_weight: float = 30.0
    residual_weight: float = 1000.0
    impulse_weight: float = 1.0
    softplus_beta: float = 50.0
    nlm: NLMParams = field(default_factory=_digits_nlm)
    nlm_grad: str = "nlm"
    median_size: int = 2
    impulse_size: int = 3
    impulse_top: int = 5
    decay: bool = True
    step_rule: str = "orthogonal"
    name = "adaptive"

    def __post_init__(self) -> None:
        if self.nlm_grad not in NLM_GRADS:
            raise ValueError(f"nlm_grad must be one of {', '.join(NLM_GRADS)}, got {self.nlm_grad!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {', '.join(STEP_RULES)}, got {self.step_rule!r}")

    def step_size(self, step: int) -> float:
        """``alpha``, or with ``decay`` a cosine schedule from ``alpha`` down to ``alpha / 10``."""
        if not self.decay:
            return self.alpha
        return self.alpha * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(self.steps - 1, 1))))

    def signals(self, model: nn.Module, surrogate: nn.Module | None, x: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The detector's signals of ``x``, (N,) each with their graph to ``x`` (``map_shift`` on the surrogate,
        only with the map term); the real model's logits of ``x``, its NLM copy and its median copy (3N, K); and
        the real model's ``map_shift`` (detached; None without the map term)."""
        n = len(x)
        nlm = bpda_nlm(x, self.nlm, self.nlm_grad)
        inputs = torch.cat([x, nlm, median_filter(x, self.median_size)])
        logits = model(inputs)
        px, pn, pm = torch.softmax(logits, dim=1).split(n)
        out = {"prediction_shift": (px - pn).abs().sum(1), "median_shift": (px - pm).abs().sum(1),
               "denoise_residual": (x - nlm).abs().mean(dim=(1, 2, 3)),
               "impulse_residual": impulse(x, self.impulse_size, self.impulse_top)}
        real_map = None
        if self.map_weight and surrogate is not None:
            target = logits[:n].detach().argmax(1).repeat(2)
            sal = saliency(surrogate, inputs[: 2 * n], target)
            out["map_shift"] = map_tv(sal[:n], sal[n:])
            chosen = logits[: 2 * n].gather(1, target[:, None]).sum()
            (real,) = torch.autograd.grad(chosen, inputs, retain_graph=True)
            real_map = map_tv(real[:n], real[n : 2 * n]).detach()
        return out, logits, real_map

    def weights(self) -> dict[str, float]:
        """The weight of each signal's term."""
        return {"prediction_shift": self.pred_weight, "median_shift": self.pred_weight, "map_shift": self.map_weight,
                "denoise_residual": self.residual_weight, "impulse_residual": self.impulse_weight}

    def losses(self, model: nn.Module, surrogate: nn.Module | None, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image (N,): the misclassification loss and the evasion loss (class docstring), both with their
        graph to ``x``; their sum with the real model's map shift in place of the surrogate's (detached: what
        the detector will measure, used to pick the best iterate); and the real model's logits of ``x``."""
        n = len(x)
        signals, logits, real_map = self.signals(model, surrogate, x)
        attack = cw_loss(logits[:n], y, self.kappa)
        evade = torch.zeros_like(attack)
        if self.copy_weight:
            evade = evade + self.copy_weight * cw_loss(logits[n:], y.repeat(2), self.kappa).view(2, n).sum(0)
        exact = attack.detach() + evade.detach()
        for name, weight in self.weights().items():
            if weight and name in signals:
                evade = evade + weight * signals[name]
                exact = exact + weight * (real_map if name == "map_shift" else signals[name].detach())
        return attack, evade, exact, logits[:n].detach()

    def direction(self, attack: torch.Tensor, evade: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The descent direction at ``v`` by ``step_rule`` (class docstring), from input gradients only."""
        if self.step_rule == "sum":
            return torch.autograd.grad((attack + evade).sum(), [v])[0]
        (g_attack,) = torch.autograd.grad(attack.sum(), [v], retain_graph=evade.requires_grad)
        g_evade = torch.autograd.grad(evade.sum(), [v])[0] if evade.requires_grad else torch.zeros_like(v)
        a, e = g_attack.flatten(1), g_evade.flatten(1)

        def without(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return g - (g * other).sum(1, keepdim=True) / (other * other).sum(1, keepdim=True).clamp_min(1e-30) * other

        done = (attack.detach() <= -self.kappa)[:, None]
        return torch.where(done, without(e, a), without(a, e)).view_as(v)

    def _forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        surrogate = softplus_surrogate(model, self.softplus_beta) if self.map_weight else None
        x_adv = random_linf_start(x, self.eps) if self.random_start else x.clone()
        best = quantise(x_adv, x, self.eps)
        best_loss = torch.full((len(x),), float("inf"), device=x.device)
        for step in range(self.steps + 1):
            v = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                vq = quantise(v, x, self.eps)
                attack, evade, exact, logits = self.losses(model, surrogate, vq, y)
                grad = self.direction(attack, evade, v) if step < self.steps else None
            # each image's best misclassified iterate, as the detector would receive it
            better = (logits.argmax(1) != y) & (exact < best_loss)
            best[better] = vq.detach()[better]
            best_loss = torch.where(better, exact, best_loss)
            if grad is not None:
                x_adv = project_linf(x_adv - self.step_size(step) * grad.sign(), x, self.eps)
        never = torch.isinf(best_loss)
        best[never] = vq.detach()[never]
        return best
