"""Named detector configurations: ``digits`` (the shipped MNIST detector) and ``photos`` (ImageNet-size models).

Each was chosen on a validation split only (even MNIST test digits, even ImageNet sample photos), never on the
odd images the evaluations report; docs/method.md says why each part is there. A calibration records the config
it was made with, and :meth:`pipeline.Detector.from_pretrained` uses that one; a preset is the starting point
of ``explainer calibrate`` and of a model without a calibration.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.config import DetectorConfig
from pipeline.denoise import NLMParams

PRESETS: dict[str, DetectorConfig] = {
    # saliency maps; NLM h=50 on a 3×3 patch in a 5×5 window; the prediction and map shifts against the NLM copy,
    # and the prediction shift against a 2×2-median copy (reports/validation/mnist_validation_search.md,
    # mnist_nlm_window_search.md, mnist_squeeze_search.md); what NLM removed and the largest residuals against a
    # 3×3 median, for the low operating points (reports/validation/mnist_operating_points_search.md)
    "digits": DetectorConfig(
        method="saliency",
        nlm=NLMParams(h=50.0, h_color=50.0, template=3, search=5),
        signals={"prediction_shift": {}, "map_shift": {}, "median_shift": {"size": 2}, "denoise_residual": {},
                 "impulse_residual": {"size": 3, "top": 5}},
    ),
    # Grad-CAM maps (saliency is blind to a patch); NLM h=10; SentiNet's two tests (inpaint the top 5% of the map,
    # paste the top 15% onto 8 clean hosts) and the Grad-CAM layer's activation norm
    # (reports/validation/imagenet_validation_search.md)
    "photos": DetectorConfig(
        method="gradcam",
        nlm=NLMParams(h=10.0, h_color=10.0, template=5, search=11),
        signals={"occlusion_shift": {"fraction": 0.05}, "prediction_shift": {}, "activation_norm": {},
                 "transplant_gain": {"fraction": 0.15, "hosts": 8}},
    ),
}

# how each preset's threshold is fitted (fit_calibration's ``folds``): None = two halves; 5 = cross-fitted over 5
# folds, so that each of a few hundred photos shapes both the CDFs and the threshold
# (reports/validation/calibration_spread.md)
CALIBRATION_FOLDS: dict[str, int | None] = {"digits": None, "photos": 5}

# how each preset's signals combine into one score (fit_calibration's ``combine``): the sum of the tail scores for
# digits (several moderately unusual signals add up: what holds detection at 1% and 0.1% FPR,
# reports/validation/mnist_operating_points_search.md), the max for photos
CALIBRATION_COMBINE: dict[str, str] = {"digits": "sum", "photos": "max"}

# the preset each built-in model starts from
MODEL_PRESETS = {"mnist": "digits", "resnet18": "photos", "mobilenet_v2": "photos"}


def preset(name: str) -> DetectorConfig:
    """The preset ``name`` (``digits`` or ``photos``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])  # a copy: its signals mapping is its own


def default_config(model: str) -> DetectorConfig:
    """The preset of built-in model ``model``: ``digits`` for mnist, ``photos`` for the ImageNet models."""
    return preset(MODEL_PRESETS.get(model, "photos"))


def default_combine(model: str) -> str:
    """How ``model``'s signals combine into its score: "sum" (digits) or "max" (photos)."""
    return CALIBRATION_COMBINE[MODEL_PRESETS.get(model, "photos")]


def default_folds(model: str) -> int | None:
    """How ``model``'s threshold is fitted: None = two halves (digits), K = cross-fitted over K folds (photos)."""
    return CALIBRATION_FOLDS[MODEL_PRESETS.get(model, "photos")]
