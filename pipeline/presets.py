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
    # Grad-CAM maps (saliency is blind to a patch); NLM h=10; the sum of five tail scores chosen on validation
    # photos at the 1% point (reports/validation/photo_signal_choice.md): how far the pooled Grad-CAM-layer features
    # lie from clean photos' and how hard they are driven (L∞ attacks), colour noise in the flattest blocks (the
    # perturbation's frequency artefact), the prediction's instability under small noise (minimal attacks), and
    # SentiNet's transplant of the top 15% of the map onto 8 clean hosts (a patch)
    "photos": DetectorConfig(
        method="gradcam",
        nlm=NLMParams(h=10.0, h_color=10.0, template=5, search=11),
        signals={"feature_distance": {"components": 64}, "activation_norm": {},
                 "chroma_residual": {"block": 16, "quantile": 0.1}, "noise_shift": {"sigma": 0.04, "copies": 4},
                 "transplant_gain": {"fraction": 0.15, "hosts": 8}},
    ),
}

# how each preset's threshold is fitted (fit_calibration's ``folds``): None = two halves; 5 = cross-fitted over 5
# folds, so that each of a few hundred photos shapes both the CDFs and the threshold
# (reports/validation/calibration_spread.md)
CALIBRATION_FOLDS: dict[str, int | None] = {"digits": None, "photos": 5}

# how each preset's signals combine into one score (fit_calibration's ``combine``): the sum of the tail scores
# (several moderately unusual signals add up: what holds detection at 1% and 0.1% FPR,
# reports/validation/mnist_operating_points_search.md, reports/validation/photo_signal_choice.md)
CALIBRATION_COMBINE: dict[str, str] = {"digits": "sum", "photos": "sum"}

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


def preset_scoring(name: str) -> dict:
    """How preset ``name`` combines its signals, as keyword arguments of ``Detector.calibrate`` (every signal
    weighs 1: the validation searches found no weights that held up beyond the images they were searched on)."""
    return {"combine": CALIBRATION_COMBINE[name]}


def default_scoring(model: str) -> dict:
    """How built-in model ``model``'s signals combine (:func:`preset_scoring` of its preset)."""
    return preset_scoring(MODEL_PRESETS.get(model, "photos"))


def default_folds(model: str) -> int | None:
    """How ``model``'s threshold is fitted: None = two halves (digits), K = cross-fitted over K folds (photos)."""
    return CALIBRATION_FOLDS[MODEL_PRESETS.get(model, "photos")]
