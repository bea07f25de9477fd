"""explainer's detection core: models, explanations, NLM denoising and other filters, signals, calibration, the
:class:`Detector`.

It imports neither Redis nor Ray nor the evaluation harness; the streaming worker reaches it only through the
names exported here.
"""

from pipeline.calibration import Calibration
from pipeline.config import DetectorConfig
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.detector import DetectionResult, Detector, Explained
from pipeline.entropy import ENTROPY_VARIANTS, map_entropy
from pipeline.errors import InputError
from pipeline.explain import METHODS, ExplainParams, explain, passes_per_image, predict_and_explain
from pipeline.inputs import decode_image, read_image_file, to_float_batch
from pipeline.models import MODEL_NAMES, TargetModel, load_model
from pipeline.presets import PRESETS, default_config, default_folds, preset
from pipeline.runtime import keep_allocations_mapped
from pipeline.samples import AdversarialDigits, Digits, load_adversarial_digits, load_sample_digits
from pipeline.signals import SIGNALS, Signal

__all__ = [
    "ENTROPY_VARIANTS",
    "METHODS",
    "MODEL_NAMES",
    "PRESETS",
    "SIGNALS",
    "AdversarialDigits",
    "Calibration",
    "DetectionResult",
    "Detector",
    "DetectorConfig",
    "Digits",
    "ExplainParams",
    "Explained",
    "InputError",
    "NLMParams",
    "Signal",
    "TargetModel",
    "decode_image",
    "default_config",
    "default_folds",
    "denoise_batch",
    "explain",
    "keep_allocations_mapped",
    "load_adversarial_digits",
    "load_model",
    "load_sample_digits",
    "map_entropy",
    "passes_per_image",
    "predict_and_explain",
    "preset",
    "read_image_file",
    "to_float_batch",
]
