"""How a detector explains, denoises and what it measures: :class:`DetectorConfig`, and its one versioned loader.

The dataclass defaults are neutral (saliency, OpenCV's own NLM defaults, the two signals that compare an image
with its NLM copy); the tuned configurations are the named presets of :mod:`pipeline.presets`. A calibration
records the config it was made with (:meth:`DetectorConfig.to_dict`), and :meth:`DetectorConfig.from_dict` reads
every version written so far.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.denoise import NLMParams
from pipeline.entropy import ENTROPY_VARIANTS
from pipeline.explain import METHODS, ExplainParams
from pipeline.signals import SIGNALS, signal

CONFIG_VERSION = 2
DEFAULT_SIGNALS = ("prediction_shift", "map_shift")


def _signal_table(given: Mapping[str, Any] | Iterable[str]) -> dict[str, object]:
    """{name: parameters} from a mapping of names to parameters (None, a dict or an instance) or a list of names."""
    items = given.items() if isinstance(given, Mapping) else ((name, None) for name in given)
    table = {name: signal(name).make_params(params) for name, params in items}
    if not table:
        raise ValueError("a detector needs at least one signal")
    return table


@dataclass(frozen=True)
class DetectorConfig:
    """``method``: the Captum method (:data:`pipeline.METHODS`); ``explain``: its parameters; ``entropy``: how a map's
    entropy is taken (:data:`pipeline.ENTROPY_VARIANTS`); ``nlm``: the denoiser; ``signals``: the signals the
    calibrated score combines, each with its parameters (:data:`pipeline.signals.SIGNALS`). Pass ``signals`` as
    names, or as a mapping of names to parameter dicts, e.g. ``{"prediction_shift": {}, "median_shift": {"size":
    2}}``; it is stored as {name: parameters dataclass or None}."""

    method: str = "saliency"
    explain: ExplainParams = field(default_factory=ExplainParams)
    entropy: str = "spatial"
    nlm: NLMParams = field(default_factory=NLMParams)
    signals: Mapping[str, object] = field(default_factory=lambda: dict.fromkeys(DEFAULT_SIGNALS))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown explanation method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.entropy not in ENTROPY_VARIANTS:
            raise ValueError(f"unknown entropy variant {self.entropy!r}; choose one of {', '.join(ENTROPY_VARIANTS)}")
        object.__setattr__(self, "signals", _signal_table(self.signals))

    def uses(self, name: str) -> bool:
        return name in self.signals

    def params(self, name: str) -> Any:
        """The parameters of signal ``name`` in this config (None when it has none or is not used)."""
        return self.signals.get(name)

    def model_signals(self) -> list[str]:
        """The configured signals that need the model once more (computed in the explanation stage)."""
        return [name for name in self.signals if SIGNALS[name].stage == "model"]

    def to_dict(self) -> dict:
        return {
            "version": CONFIG_VERSION,
            "method": self.method,
            "explain": asdict(self.explain),
            "entropy": self.entropy,
            "nlm": asdict(self.nlm),
            "signals": {name: {} if p is None else asdict(p) for name, p in self.signals.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorConfig:
        """A config saved by :meth:`to_dict`, of any version (1: no ``version`` key, one knob per check)."""
        version = data.get("version", 1)
        if version == 1:
            data = _upgrade_v1(data)
        elif version != CONFIG_VERSION:
            raise ValueError(f"detector config version {version} is newer than this explainer reads "
                             f"({CONFIG_VERSION}): upgrade explainer")
        unknown = set(data) - {"version", "method", "explain", "entropy", "nlm", "signals"}
        if unknown:
            raise ValueError(f"unknown detector config keys: {', '.join(sorted(unknown))}")
        defaults = cls()
        return cls(
            method=data.get("method", defaults.method),
            explain=ExplainParams(**data.get("explain", {})),
            entropy=data.get("entropy", defaults.entropy),
            nlm=NLMParams(**data.get("nlm", {})),
            signals=data.get("signals", DEFAULT_SIGNALS),
        )


# version 1 scored these when its "signals" key was absent (configs saved before the median check existed)
_V1_SIGNALS = ("prediction_shift", "map_shift")
_V1_NLM = {"h": 50.0, "h_color": 50.0, "template": 3, "search": 5}


def _upgrade_v1(data: Mapping[str, Any]) -> dict:
    """Version 1 kept each check's parameters in top-level knobs (``median``, ``occlusion``, ``transplant``,
    ``transplant_hosts``) beside a list of signal names, and called NLM's median pre-filter ``nlm.median``."""
    nlm = {**_V1_NLM, **data.get("nlm", {})}  # version 1's NLM defaults were the digits' ones
    nlm["pre_median"] = nlm.pop("median", 0)
    knobs = {
        "median_shift": {"size": int(data.get("median", 0))},
        "occlusion_shift": {"fraction": float(data.get("occlusion", 0.0))},
        "transplant_gain": {"fraction": float(data.get("transplant", 0.0)),
                            "hosts": int(data.get("transplant_hosts", 8))},
    }
    return {
        "version": CONFIG_VERSION,
        "method": data.get("method", "saliency"),
        "explain": data.get("explain", {}),
        "entropy": data.get("entropy", "spatial"),
        "nlm": nlm,
        "signals": {name: knobs.get(name, {}) for name in data.get("signals", _V1_SIGNALS)},
    }
