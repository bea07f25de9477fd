"""explainer's detection core: models, explanations, NLM denoising and other filters, signals, calibration, the
:class:`Detector`.

It imports neither Redis nor Ray nor the evaluation harness; the streaming worker reaches it only through the
names exported here.
"""

from pipeline.bundle import bundle_digest, check_detector_name, load_decider, split_pin
from pipeline.calibration import (
    DEFAULT_FPRS,
    Calibration,
    OperatingPoint,
    PointCheck,
    check_points,
    fpr_label,
    rate_ci95,
)
from pipeline.config import DetectorConfig
from pipeline.decision import RULES, Decider, DetectionResult, Explained
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.detector import BUILTIN_DETECTORS, Detector, denoise_prepared, images_per_call, pretrained_decider
from pipeline.entropy import ENTROPY_VARIANTS, map_entropy
from pipeline.errors import ImageTooLargeError, InputError
from pipeline.explain import METHODS, ExplainParams, explain, passes_per_image, predict_and_explain
from pipeline.imagecost import ImageCost, cost_problem, decode_cost, png_chunk_problem
from pipeline.inputs import MAX_DECODE_BYTES, decode_image, image_files, read_image_file, to_float_batch
from pipeline.models import (
    MODEL_NAMES,
    ModelSource,
    TargetModel,
    load_model,
    load_network,
    parse_model_ref,
    wrap_network,
)
from pipeline.presets import (
    CALIBRATION_FOLDS,
    MODEL_PRESETS,
    PRESETS,
    default_config,
    default_folds,
    default_scoring,
    preset,
    preset_scoring,
)
from pipeline.queries import Fingerprint, ProbeHistory, ProbeParams
from pipeline.runtime import MemoryCeiling, keep_allocations_mapped
from pipeline.samples import AdversarialDigits, Digits, load_adversarial_digits, load_sample_digits
from pipeline.signals import SIGNALS, Signal

__all__ = [
    "BUILTIN_DETECTORS",
    "CALIBRATION_FOLDS",
    "DEFAULT_FPRS",
    "ENTROPY_VARIANTS",
    "METHODS",
    "MODEL_NAMES",
    "MODEL_PRESETS",
    "PRESETS",
    "SIGNALS",
    "MAX_DECODE_BYTES",
    "AdversarialDigits",
    "Fingerprint",
    "ProbeHistory",
    "ProbeParams",
    "RULES",
    "Calibration",
    "Decider",
    "DetectionResult",
    "Detector",
    "DetectorConfig",
    "Digits",
    "ExplainParams",
    "Explained",
    "ImageCost",
    "ImageTooLargeError",
    "InputError",
    "ModelSource",
    "NLMParams",
    "OperatingPoint",
    "PointCheck",
    "Signal",
    "TargetModel",
    "bundle_digest",
    "check_detector_name",
    "check_points",
    "cost_problem",
    "decode_cost",
    "decode_image",
    "default_config",
    "default_folds",
    "default_scoring",
    "denoise_batch",
    "denoise_prepared",
    "explain",
    "fpr_label",
    "image_files",
    "keep_allocations_mapped",
    "images_per_call",
    "MemoryCeiling",
    "load_adversarial_digits",
    "load_decider",
    "load_model",
    "load_network",
    "load_sample_digits",
    "map_entropy",
    "parse_model_ref",
    "png_chunk_problem",
    "preset_scoring",
    "passes_per_image",
    "predict_and_explain",
    "preset",
    "pretrained_decider",
    "rate_ci95",
    "read_image_file",
    "split_pin",
    "to_float_batch",
    "wrap_network",
]
