"""explainer's detection core: models, explanations, NLM denoising, entropy, calibration, decisions, attacks.

It imports neither Redis nor Ray; the streaming worker reaches it only through the names exported here.
"""

from pipeline.calibration import Calibration
from pipeline.data import AdversarialDigits, Digits, load_adversarial_digits, load_sample_digits, load_test_digits
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.detector import DetectionResult, Detector, DetectorConfig, Explained
from pipeline.entropy import ENTROPY_VARIANTS, map_entropy
from pipeline.errors import InputError
from pipeline.explain import METHODS, ExplainParams, explain, passes_per_image, predict_and_explain
from pipeline.inputs import decode_image, read_image_file, to_float_batch
from pipeline.models import MODEL_NAMES, TargetModel, load_model
from pipeline.runtime import keep_allocations_mapped

__all__ = [
    "ENTROPY_VARIANTS",
    "METHODS",
    "MODEL_NAMES",
    "Calibration",
    "DetectionResult",
    "Detector",
    "DetectorConfig",
    "AdversarialDigits",
    "Digits",
    "ExplainParams",
    "Explained",
    "load_adversarial_digits",
    "InputError",
    "keep_allocations_mapped",
    "NLMParams",
    "TargetModel",
    "decode_image",
    "denoise_batch",
    "explain",
    "predict_and_explain",
    "load_model",
    "load_sample_digits",
    "load_test_digits",
    "map_entropy",
    "passes_per_image",
    "read_image_file",
    "to_float_batch",
]
