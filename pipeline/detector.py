"""The EXPLAINER detector: denoise, explain original and denoised together, compare, decide.

One :meth:`Detector.detect` call handles a whole batch with one NLM pass over a thread pool, one forward pass
for the predictions and one Captum call for the 2N explanation maps (originals and denoised copies together).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines.feature_squeezing import median_filter
from pipeline.calibration import LEGACY_SIGNALS, SCORE_SIGNALS, Calibration, fit_calibration
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.entropy import map_entropy, map_shift
from pipeline.errors import InputError
from pipeline.explain import GRADIENT_ONLY_METHODS, ExplainParams, predict_and_explain
from pipeline.inputs import image_layout, pixels_to_float, to_float_batch, to_uint8_batch
from pipeline.models import TargetModel, load_model
from pipeline.occlude import occlude_top_relevance
from pipeline.transplant import decode_hosts, encode_hosts, pick_hosts, transplant_gain

ASSETS = Path(__file__).resolve().parent / "assets"
RULES = ("calibrated", "sign")


@dataclass(frozen=True)
class DetectorConfig:
    """How to explain, denoise and measure. The shipped calibration records the config it was made with."""

    method: str = "saliency"
    explain: ExplainParams = field(default_factory=ExplainParams)
    entropy: str = "spatial"
    nlm: NLMParams = field(default_factory=NLMParams)
    # fraction of the original's map inpainted before a second prediction (pipeline.occlude); 0 = off. It gives
    # the ``occlusion_shift`` signal that sees a patch, which NLM cannot remove (docs/method.md, ImageNet).
    occlusion: float = 0.0
    # side of a median filter (2 = Feature Squeezing's 2×2 for MNIST) whose output the originals are classified on
    # once more; 0 = off. It gives the ``median_shift`` signal: the second denoiser that catches CW-L0's few
    # saturated pixels, which NLM keeps (docs/method.md; chosen on the validation split of even digits).
    median: int = 2
    # fraction of the original's map pasted onto ``transplant_hosts`` clean host images, which are classified
    # again; 0 = off. It gives the ``transplant_gain`` signal (pipeline.transplant): a universal patch pulls the
    # hosts towards its class (docs/method.md, ImageNet, stop 14; chosen on even photos only). Calibration picks
    # the hosts; an uncalibrated detector (the sign rule, which does not use the signal) skips the check
    transplant: float = 0.0
    transplant_hosts: int = 8
    # the signals the calibrated score combines (pipeline.calibration.SIGNALS); ``activation_norm`` is measured
    # only when listed here (a hook on the Grad-CAM layer during the prediction's pass, no extra pass; it puts
    # the explanation on the model's lock, see Detector.explain_pair)
    signals: tuple[str, ...] = SCORE_SIGNALS

    def __post_init__(self) -> None:
        for signal, knob, on in (("median_shift", "median", self.median > 0),
                                 ("occlusion_shift", "occlusion", self.occlusion > 0),
                                 ("transplant_gain", "transplant", self.transplant > 0)):
            if signal in self.signals and not on:
                raise ValueError(f"the score uses {signal} but {knob} is off: set {knob} or drop {signal} "
                                 "from signals")
        if self.transplant and not (0.0 < self.transplant < 1.0 and self.transplant_hosts >= 1):
            raise ValueError(f"the transplant pastes a fraction in (0, 1) of each map onto at least one host, got "
                             f"transplant={self.transplant} and transplant_hosts={self.transplant_hosts}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        return cls(
            method=data.get("method", cls.method),
            explain=ExplainParams(**data.get("explain", {})),
            entropy=data.get("entropy", "spatial"),
            nlm=NLMParams(**data.get("nlm", {})),
            occlusion=float(data.get("occlusion", 0.0)),
            median=int(data.get("median", 0)),  # absent: a config saved before the median check existed
            transplant=float(data.get("transplant", 0.0)),
            transplant_hosts=int(data.get("transplant_hosts", cls.transplant_hosts)),
            signals=tuple(data.get("signals", LEGACY_SIGNALS)),
        )


def _is_uint8(images: object) -> bool:
    return isinstance(images, np.ndarray) and images.dtype == np.uint8


def to_uint8_hwc(x: np.ndarray) -> np.ndarray:
    """A prepared float batch (N, C, H, W) in [0, 1] as the uint8 (N, H, W, C) images OpenCV takes."""
    return np.ascontiguousarray(np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1))


@dataclass
class Explained:
    """What the explanation stage hands on: softmax outputs (2N, K) and maps (2N, C, H, W), originals first;
    with occlusion on, the softmax outputs (N, K) of the originals with their most relevant region inpainted;
    with the median check on, those (N, K) of the median-filtered originals; with ``activation_norm`` among the
    signals, that signal (N,) of the originals; with the transplant on, ``transplant_gain`` (N,) of the
    originals."""

    probs: np.ndarray
    maps: np.ndarray
    occluded_probs: np.ndarray | None = None
    median_probs: np.ndarray | None = None
    activation_norm: np.ndarray | None = None
    transplant_gain: np.ndarray | None = None

    def part(self, a: int, b: int) -> Explained:
        """The images a..b of the batch (their originals and their denoised copies)."""
        n = len(self.probs) // 2
        rows = np.r_[a:b, n + a : n + b]
        checks = {k: None if (v := getattr(self, k)) is None else v[a:b] for k in _originals_only(Explained)}
        return Explained(probs=self.probs[rows], maps=self.maps[rows], **checks)

    @classmethod
    def concat(cls, parts: list[Explained]) -> Explained:
        """The batch made of ``parts`` in order (the inverse of :meth:`part`): originals first, then copies."""
        halves = [len(p.probs) // 2 for p in parts]

        def both(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            return np.concatenate([a[:n] for a, n in zip(arrays, halves, strict=True)]
                                  + [a[n:] for a, n in zip(arrays, halves, strict=True)])

        def originals(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return cls(probs=both("probs"), maps=both("maps"), **{k: originals(k) for k in _originals_only(cls)})


def _originals_only(cls: type) -> list[str]:
    """The fields of :class:`Explained` that hold the originals' rows only (the checks' outputs)."""
    return [f.name for f in fields(cls) if f.name not in ("probs", "maps")]


# the signals that only some configurations measure: a DetectionResult field each, None when not measured
OPTIONAL_SIGNALS = ("occlusion_shift", "median_shift", "activation_norm", "transplant_gain")


@dataclass
class DetectionResult:
    """Per-image arrays over the batch, plus the threshold and rule that produced ``is_adversarial``."""

    predicted_class: np.ndarray
    confidence: np.ndarray
    denoised_class: np.ndarray
    entropy_original: np.ndarray
    entropy_denoised: np.ndarray
    prediction_shift: np.ndarray
    map_shift: np.ndarray
    score: np.ndarray
    is_adversarial: np.ndarray
    threshold: float
    rule: str
    maps: np.ndarray | None = None  # attribution maps of the originals (N, H, W), when asked for
    occlusion_shift: np.ndarray | None = None  # with occlusion on (DetectorConfig.occlusion)
    median_shift: np.ndarray | None = None  # with the median check on (DetectorConfig.median)
    activation_norm: np.ndarray | None = None  # with "activation_norm" among DetectorConfig.signals
    transplant_gain: np.ndarray | None = None  # with the transplant on (DetectorConfig.transplant)

    def __len__(self) -> int:
        return len(self.score)

    @property
    def entropy_change(self) -> np.ndarray:
        return self.entropy_denoised - self.entropy_original

    def signals(self) -> dict[str, np.ndarray]:
        return {
            "entropy_original": self.entropy_original,
            "entropy_denoised": self.entropy_denoised,
            "entropy_change": self.entropy_change,
            "prediction_shift": self.prediction_shift,
            "map_shift": self.map_shift,
            **{k: v for k in OPTIONAL_SIGNALS if (v := getattr(self, k)) is not None},
        }

    def rows(self) -> list[dict]:
        """One plain-Python dict per image (for JSON and the wire)."""
        names = [f.name for f in fields(self)
                 if f.name not in ("threshold", "rule", "maps") and getattr(self, f.name) is not None]
        cols = {n: getattr(self, n).tolist() for n in names}
        return [
            {**{n: cols[n][i] for n in names}, "threshold": self.threshold, "rule": self.rule}
            for i in range(len(self))
        ]


@contextmanager
def first_output(layer: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
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


def pooled_activation_norm(activations: torch.Tensor) -> np.ndarray:
    """The ``activation_norm`` signal of (N, C, h, w) activations: the L2 norm over channels of each channel's
    spatial maximum. It says how hard the image drives the last block's features at their strongest; a patch
    and iterative L∞ attacks drive them beyond clean photos (upper tail; docs/method.md, stop 13)."""
    return activations.float().amax(dim=(2, 3)).norm(dim=1).cpu().numpy()


def _offset_progress(report, skipped: int, done: int) -> None:
    report(done + skipped)


class Detector:
    """Adversarial-image detector around one target model."""

    def __init__(
        self, model: TargetModel, config: DetectorConfig = DetectorConfig(), calibration: Calibration | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.calibration = calibration
        # the transplant's clean host images, uint8 (K, H, W, C), and their tensors on the device (made lazily)
        self.hosts = decode_hosts(calibration.hosts) if calibration and calibration.hosts else None
        self._host_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        if calibration and "transplant_gain" in calibration.signals and self.hosts is None:
            # fail when a deployment starts, not on every batch it is sent
            raise ValueError("the calibration scores transplant_gain but holds no host images: recalibrate with the "
                             "transplant on (explainer calibrate), which picks and stores them")

    @classmethod
    def from_pretrained(
        cls, name: str = "mnist", weights: str | Path | None = None, calibration: str | Path | None = None,
        random_init: bool = False, device: str | None = None,
    ) -> Detector:
        """The model ``name`` with its calibration: ``calibration`` if given, else the shipped one
        (``pipeline/assets/<name>_calibration.json``) if it exists. Its config is the calibration's config."""
        model = load_model(name, weights, random_init=random_init)
        if device:
            model.to(device)
        path = Path(calibration) if calibration is not None else ASSETS / f"{name}_calibration.json"
        if calibration is not None and not path.exists():
            raise FileNotFoundError(f"calibration file not found: {path}")
        cal = Calibration.load(path) if path.exists() else None
        if cal:
            config = DetectorConfig.from_dict(cal.config)
        else:
            from pipeline.configs import default_config  # configs imports this module

            config = default_config(name)
        return cls(model, config, cal)

    # -- the stages, usable one by one (the Ray Serve deployments run them on different workers) ---------------

    def prepare(self, images: object, as_pixels: bool = False) -> np.ndarray:
        """Validate and convert user images to float32 (N, C, H, W) in [0, 1] at the model's resolution.

        ``as_pixels``: return uint8 images as the uint8 (N, C, H, W) pixels the float batch is made of, a quarter
        of its bytes (the Serve stages pass those between them; :meth:`denoise` and :meth:`explain_pair` take
        either, with the same results). Float images are returned as floats either way."""
        if self.model.resize_to is not None:
            # photos of any size: validate each, resize/centre-crop to the model's input, keep uint8 pixels
            singles = images if isinstance(images, (list, tuple)) else [images]
            if not singles:
                raise InputError("empty batch: no images given")
            # each photo resized while still uint8, so only the model's input size is ever held as float
            batch = np.concatenate([self.model.prepare(to_uint8_batch(im, self.model.channels)) for im in singles])
            if not as_pixels:
                batch = pixels_to_float(batch)
        else:
            # uint8 digits are laid out and size-checked before the float copy is made; floats are kept exact
            channels = self.model.channels
            batch = to_uint8_batch(images, channels) if _is_uint8(images) else to_float_batch(images, channels)
            self.model.check_size(*batch.shape[1:3])
            if batch.dtype == np.uint8 and not as_pixels:
                batch = pixels_to_float(batch)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def check(self, image: np.ndarray) -> None:
        """Raise :class:`InputError` if one H×W[×C] image could not be prepared (layout, channels, size); no
        pixel is converted. A stream worker asks this of every image of a read before it batches them, so that
        a bad image costs nothing and gets its own error without holding back the others."""
        self.model.check_size(*image_layout(image, self.model.channels)[:2])

    def denoise(self, x: np.ndarray, workers: int | None = None) -> np.ndarray:
        """NLM-denoised copy of a prepared batch (CPU, OpenCV thread pool of ``workers`` threads, default one
        per core), (N, C, H, W): float32 for a float batch, uint8 pixels for pixels (``prepare(as_pixels=True)``;
        NLM works on uint8 either way, so the two agree exactly)."""
        pixels = x.dtype == np.uint8
        out = denoise_batch(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if pixels else to_uint8_hwc(x),
                            self.config.nlm, workers=workers)
        out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
        return out if pixels else pixels_to_float(out)

    def explain_pair(self, x: np.ndarray, xd: np.ndarray) -> Explained:
        """Predictions and explanation maps for originals and denoised copies in one batch of 2N images, all
        explaining the class predicted on the original (the model-bound stage; see ``predict_and_explain``).
        With ``config.occlusion`` the originals are also classified once more with their most relevant region
        inpainted, and with ``config.median`` once more median-filtered (one inference-only forward pass each);
        with ``config.transplant`` and hosts, their most relevant region is pasted onto each of the K hosts, which
        are classified again (K inference-only passes per image; an uncalibrated detector has no hosts and skips
        it, and a detector with hosts runs it whatever the rule).

        Safe to call from several threads at once (the Serve Explainer overlaps batches): gradient-only methods
        share nothing but the read-only weights; hook-based ones, and any method when ``activation_norm`` is among
        the signals (its hook sits on the shared model), are serialised on the model's lock (shared by every
        Detector of that model)."""
        hooked = self.config.method not in GRADIENT_ONLY_METHODS or self._wants_activation_norm
        x, xd = (pixels_to_float(a) if a.dtype == np.uint8 else a for a in (x, xd))  # pixels: the same floats
        with self.model.hooks_lock if hooked else nullcontext():
            return self._explain_pair(x, xd)

    @property
    def _wants_activation_norm(self) -> bool:
        return "activation_norm" in self.config.signals

    def _explain_pair(self, x: np.ndarray, xd: np.ndarray) -> Explained:
        n = len(x)
        device = self.model.device
        both = torch.from_numpy(np.concatenate([x, xd])).to(device).contiguous(memory_format=torch.channels_last)
        with (first_output(self.model.gradcam_layer) if self._wants_activation_norm else nullcontext()) as seen:
            probs, attr = predict_and_explain(self.model.net, both, n, self.config.method, self.config.explain,
                                              self.model.gradcam_layer)
        activation_norm = None
        if seen is not None:
            if not seen or len(seen[0]) != 2 * n:  # another caller's pass, or none: never score a foreign tensor
                raise RuntimeError("the Grad-CAM layer's hook did not see this batch's prediction pass")
            activation_norm = pooled_activation_norm(seen[0][:n])
        maps = np.ascontiguousarray(attr.float().cpu().numpy())
        occluded_probs = None
        if self.config.occlusion > 0:
            occluded = occlude_top_relevance(to_uint8_hwc(x), maps[:n], self.config.occlusion)
            xo = torch.from_numpy(occluded).permute(0, 3, 1, 2).to(device).float() / 255  # a channels-last view
            with torch.inference_mode():
                occluded_probs = torch.softmax(self.model.net(xo).float(), dim=1).cpu().numpy()
        median_probs = None
        if self.config.median > 0:
            with torch.inference_mode():
                xm = median_filter(both[:n], self.config.median)  # the originals, already on the device
                median_probs = torch.softmax(
                    self.model.net(xm.contiguous(memory_format=torch.channels_last)).float(), dim=1).cpu().numpy()
        gain = None
        if self.config.transplant > 0 and self.hosts is not None:  # none before calibration: the sign rule only
            hosts, host_probs = self._hosts_on_device()
            gain = transplant_gain(self.model.net, both[:n], probs[:n].argmax(1), maps[:n], hosts, host_probs,
                                   self.config.transplant)
        return Explained(probs=probs.cpu().numpy(), maps=maps, occluded_probs=occluded_probs,
                         median_probs=median_probs, activation_norm=activation_norm, transplant_gain=gain)

    def host_rows(self, n: int) -> np.ndarray:
        """Which of ``n`` clean calibration images :meth:`calibrate` makes the transplant's hosts (none when the
        transplant is off). An evaluation keeps them out of what its attacker trains on, as an operator keeps
        them private."""
        if self.config.transplant <= 0:
            return np.zeros(0, dtype=int)
        return pick_hosts(n, self.config.transplant_hosts)

    def use_hosts(self, images: object) -> None:
        """Make ``images`` (clean, any form :meth:`prepare` takes) the transplant's hosts; calibration picks them
        from its clean images, and a timing run can pass any clean photos."""
        self.hosts, self._host_tensors = to_uint8_hwc(self.prepare(images)), None

    def _hosts_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The transplant's hosts (K, C, H, W) on the model's device and their clean softmax outputs (K, classes)."""
        if self._host_tensors is None:
            x = torch.from_numpy(self.hosts).permute(0, 3, 1, 2).to(self.model.device).float().div(255)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                self._host_tensors = (x, torch.softmax(self.model.net(x).float(), dim=1))
        return self._host_tensors

    def measure(self, explained: Explained) -> dict[str, np.ndarray]:
        """Per-image signals from the maps and predictions: entropies before/after, prediction shift."""
        probs, n = explained.probs, len(explained.probs) // 2
        maps = torch.from_numpy(explained.maps)
        ent = map_entropy(maps, self.config.entropy).numpy().astype(np.float64)
        return {
            "predicted_class": probs[:n].argmax(1),
            "confidence": probs[:n].max(1).astype(np.float64),
            "denoised_class": probs[n:].argmax(1),
            "entropy_original": ent[:n],
            "entropy_denoised": ent[n:],
            "prediction_shift": np.abs(probs[:n] - probs[n:]).sum(1).astype(np.float64),
            "map_shift": map_shift(maps[:n], maps[n:]).numpy().astype(np.float64),
            **({} if explained.occluded_probs is None else
               {"occlusion_shift": np.abs(probs[:n] - explained.occluded_probs).sum(1).astype(np.float64)}),
            **({} if explained.median_probs is None else
               {"median_shift": np.abs(probs[:n] - explained.median_probs).sum(1).astype(np.float64)}),
            **({} if explained.activation_norm is None else
               {"activation_norm": explained.activation_norm.astype(np.float64)}),
            **({} if explained.transplant_gain is None else {"transplant_gain": explained.transplant_gain}),
        }

    def decide(self, explained: Explained, rule: str | None = None, return_maps: bool = False) -> DetectionResult:
        """Entropy and decision (the CPU stage after explanation). ``rule``: "calibrated" (default when a
        calibration exists) or "sign" (the paper's: adversarial when entropy did not decrease)."""
        rule = rule or ("calibrated" if self.calibration else "sign")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        s = self.measure(explained)
        change = s["entropy_denoised"] - s["entropy_original"]
        if rule == "sign":
            score, threshold = change, 0.0
            flagged = change >= 0
        else:
            if self.calibration is None:
                raise ValueError("the calibrated rule needs a calibration: run calibrate() or load one")
            if missing := [k for k in self.calibration.signals if k not in s and k != "entropy_change"]:
                hint = (" (the transplant check needs its clean host images, which calibration picks and stores: "
                        "calibrate with the transplant on, or load such a calibration)"
                        if "transplant_gain" in missing else "")
                raise ValueError(f"the calibration scores {', '.join(missing)}, which this detector's configuration "
                                 f"does not measure{hint}")
            score = self.calibration.score({**s, "entropy_change": change})
            threshold = self.calibration.threshold
            flagged = score > threshold
        n = len(score)
        return DetectionResult(
            predicted_class=s["predicted_class"], confidence=s["confidence"], denoised_class=s["denoised_class"],
            entropy_original=s["entropy_original"], entropy_denoised=s["entropy_denoised"],
            prediction_shift=s["prediction_shift"], map_shift=s["map_shift"], score=np.asarray(score, dtype=np.float64),
            is_adversarial=np.asarray(flagged, dtype=bool), threshold=float(threshold), rule=rule,
            maps=explained.maps[:n].sum(1) if return_maps else None, **{k: s.get(k) for k in OPTIONAL_SIGNALS},
        )

    # -- whole batches in-process ------------------------------------------------------------------------------

    def analyse(self, images: object) -> dict[str, np.ndarray]:
        """Signals for a batch without a decision (calibration and evaluation use this)."""
        x = self.prepare(images)
        return self.measure(self.explain_pair(x, self.denoise(x)))

    def detect(self, images: object, rule: str | None = None, return_maps: bool = False) -> DetectionResult:
        """Verdicts for a batch: prepare, denoise, explain originals and denoised together, decide."""
        x = self.prepare(images)
        return self.decide(self.explain_pair(x, self.denoise(x)), rule, return_maps)

    def analyse_many(self, images: np.ndarray, batch_size: int = 256, progress=None) -> dict[str, np.ndarray]:
        """:meth:`analyse` over a large array in batches; ``progress(n_done)`` is called after each batch."""
        parts = []
        for start in range(0, len(images), batch_size):
            parts.append(self.analyse(images[start : start + batch_size]))
            if progress:
                progress(min(start + batch_size, len(images)))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def calibrate(
        self, clean_images: np.ndarray, target_fpr: float = 0.05, images: str = "", batch_size: int = 256,
        progress=None, confidence: float | None = None, folds: int | None = None,
    ) -> Calibration:
        """Fit the calibrated rule on clean images only; sets and returns the calibration. ``confidence``: set
        the threshold so that the target FPR holds with that confidence, not just in expectation. ``folds``:
        cross-fit the CDFs and the threshold over that many folds (small sets; ``fit_calibration``).

        With the transplant on, ``config.transplant_hosts`` of the images (spread over the list) become its hosts:
        they are kept out of the fit (a host pasted onto itself would not move) and stored in the calibration."""
        hosts, before = None, (self.hosts, self._host_tensors)
        if self.config.transplant > 0:
            chosen = self.host_rows(len(clean_images))
            if isinstance(clean_images, (list, tuple)):  # photos of several sizes
                self.use_hosts([clean_images[i] for i in chosen])
                taken = set(chosen.tolist())
                clean_images = [im for i, im in enumerate(clean_images) if i not in taken]
            else:
                self.use_hosts(clean_images[chosen])
                clean_images = np.delete(clean_images, chosen, axis=0)
            hosts = self.hosts
            images = (images or f"{len(clean_images) + len(chosen)} clean images") + (
                f", {len(chosen)} of them kept out as the transplant's hosts")
            if progress:  # the hosts count as done, so that a bar over all the caller's images ends full
                progress = partial(_offset_progress, progress, len(chosen))
        try:
            s = self.analyse_many(clean_images, batch_size, progress)
            s["entropy_change"] = s["entropy_denoised"] - s["entropy_original"]
            calibration = fit_calibration(
                s, target_fpr, model=self.model.name, method=self.config.method, entropy=self.config.entropy,
                images=images or f"{len(clean_images)} clean images", config=self.config.to_dict(),
                use=self.config.signals, confidence=confidence, folds=folds,
            )
        except Exception as e:
            self.hosts, self._host_tensors = before  # the detector stays as it was
            if hosts is not None:
                e.add_note(f"{len(hosts)} of the clean images were kept out as the transplant's hosts")
            raise
        self.calibration = calibration
        if hosts is not None:
            self.calibration.hosts = encode_hosts(hosts)
        return self.calibration
