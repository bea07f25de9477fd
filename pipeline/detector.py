"""The EXPLAINER detector: denoise, explain original and denoised together, compare, decide.

One :meth:`Detector.detect` call handles a whole batch with one NLM pass over a thread pool, one forward pass
for the predictions and one Captum call for the 2N explanation maps (originals and denoised copies together).
What it measures is the registry of :mod:`pipeline.signals`; which signals its score combines, and with which
parameters, is its :class:`pipeline.DetectorConfig`.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.bundle import check_detector_name, load_bundle, load_decider, save_bundle
from pipeline.calibration import Calibration, PointCheck, check_points, fit_calibration
from pipeline.config import DetectorConfig
from pipeline.decision import Decider, DetectionResult, Explained
from pipeline.denoise import NLMParams, denoise_batch
from pipeline.errors import InputError
from pipeline.explain import GRADIENT_ONLY_METHODS, predict_and_explain
from pipeline.inputs import image_layout, pixels_to_float, to_float_batch, to_uint8_batch, to_uint8_hwc
from pipeline.models import MODEL_NAMES, TargetModel, load_model, wrap_network
from pipeline.models.source import source_of
from pipeline.signals import SIGNALS, ModelPass
from pipeline.transplant import decode_hosts, encode_hosts, pick_hosts

ASSETS = Path(__file__).resolve().parent / "assets"
# the shipped detectors, one bundle per built-in model that has a calibration (pipeline.bundle)
SHIPPED_BUNDLES = ASSETS / "detectors"
# the detectors a name alone picks: every built-in model's, and each shipped bundle (e.g. mnist-robust: the digits
# CNN adversarially trained), whose folder under SHIPPED_BUNDLES is its name
BUILTIN_DETECTORS = tuple(dict.fromkeys([*MODEL_NAMES, *sorted(
    folder.name for folder in SHIPPED_BUNDLES.iterdir() if (folder / "detector.json").is_file())]))
# explanation methods that read a layer of the model (its Grad-CAM layer)
LAYER_METHODS = frozenset({"gradcam", "guided_gradcam"})
# what one model call should hold, in input values (images × channels × height × width): 16 ImageNet photos. On
# two CPU cores MobileNetV2's detector takes 0.16–0.19 s a photo in calls of 1 to 16 and more in larger ones
# (0.20 s at 32, 0.55–0.67 s at 40: memory-bound), while a call of digits is bounded by the batch size alone.
VALUES_PER_CALL = 16 * 3 * 224 * 224


def images_per_call(channels: int, height: int, width: int) -> int:
    """How many images of this shape one model call should take (:data:`VALUES_PER_CALL`, at least one): the
    stream reads and merges photos in calls of this many, digits in calls of its batch size."""
    return max(1, VALUES_PER_CALL // (channels * height * width))


def _is_uint8(images: object) -> bool:
    return isinstance(images, np.ndarray) and images.dtype == np.uint8


def denoise_prepared(x: np.ndarray, nlm: NLMParams, workers: int | None = None) -> np.ndarray:
    """NLM-denoised copy of a prepared batch (N, C, H, W), float32 or uint8 pixels as given (:meth:`Detector.denoise`;
    the Serve app's Denoiser calls this with the detector's NLM parameters alone)."""
    pixels = x.dtype == np.uint8
    out = denoise_batch(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if pixels else to_uint8_hwc(x), nlm,
                        workers=workers)
    out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out if pixels else pixels_to_float(out)


def pretrained_decider(name: str, calibration: str | Path | None = None, shipped: bool = True) -> Decider:
    """What deciding needs of the built-in detector ``name``, without its network: its shipped bundle's config
    and calibration (``shipped``), or ``calibration``'s file and config, or its preset uncalibrated."""
    bundle = SHIPPED_BUNDLES / name
    if calibration is None and shipped and (bundle / "detector.json").is_file():
        return load_decider(bundle)
    if calibration is not None:
        if not Path(calibration).exists():
            raise FileNotFoundError(f"calibration file not found: {calibration}")
        cal = Calibration.load(calibration)
        return Decider(name, DetectorConfig.from_dict(cal.config), cal)
    from pipeline.presets import default_config  # presets import the config, which this module imports

    return Decider(name, default_config(name))


def _offset_progress(report, skipped: int, done: int) -> None:
    report(done + skipped)


def _check_model_supports(model: TargetModel, config: DetectorConfig) -> None:
    """Refuse, when the detector is made, a config whose method or signals the model cannot run: a layer method
    without a layer, or any hook in a network that runs none (an exported program, TorchScript)."""
    hooked = [name for name in config.signals if SIGNALS[name].hook is not None]
    if not model.hookable and (config.method not in GRADIENT_ONLY_METHODS or hooked):
        what = [f"method {config.method}"] if config.method not in GRADIENT_ONLY_METHODS else []
        raise ValueError(
            f"{' and '.join(what + [f'the {h} signal' for h in hooked])} hook a layer of the network, and "
            f"{model.name}'s network ({model.source.kind}) runs as one compiled graph that fires no hooks: use a "
            f"gradient method ({', '.join(sorted(GRADIENT_ONLY_METHODS))})"
            + (f" without {', '.join(hooked)}" if hooked else "")
            + ", e.g. explainer calibrate --method saliency"
            + (" --signals " + ",".join(n for n in config.signals if n not in hooked) if hooked else "")
            + "; or load the network from module:callable, whose layers run hooks")
    if (config.method in LAYER_METHODS or hooked) and model.gradcam_layer is None:
        raise ValueError(f"method {config.method}" + "".join(f" and the {h} signal" for h in hooked)
                         + f" read a layer of the network, and {model.name} has none to read: name one "
                         "(explain_layer=, --explain-layer)")


class Detector:
    """Adversarial-image detector around one target model."""

    def __init__(
        self, model: TargetModel, config: DetectorConfig | None = None, calibration: Calibration | None = None
    ) -> None:
        self.model = model
        # the config, the calibration and the operating point decisions are made at (None: the calibration's
        # default), held by the decider the CPU stage after explanation uses alone (pipeline.decision)
        self.decider = Decider(model.name, config if config is not None else DetectorConfig(), calibration)
        _check_model_supports(model, self.config)
        # the transplant's clean host images, uint8 (K, H, W, C), and their tensors on the device (made lazily)
        self.hosts = (decode_hosts(calibration.hosts, (model.size, model.size, model.channels))
                      if calibration and calibration.hosts else None)
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
        """The built-in model ``name`` as shipped: its bundle (``pipeline/assets/detectors/<name>``: mnist,
        mobilenet_v2) with ``weights`` if given. With ``calibration``, that file's calibration and config instead;
        a model with neither (resnet18, or ``random_init`` for timing) is uncalibrated, on its preset, and decides
        only with the sign rule asked for by name."""
        bundle = SHIPPED_BUNDLES / name
        if calibration is None and not random_init and (bundle / "detector.json").is_file():
            return cls.load(bundle, weights=weights, device=device)
        model = load_model(name, weights, random_init=random_init)
        if device:
            model.to(device)
        decider = pretrained_decider(name, calibration, shipped=False)
        return cls(model, decider.config, decider.calibration)

    @classmethod
    def from_model(
        cls, net: torch.nn.Module | torch.export.ExportedProgram, *, input_size: int, channels: int,
        normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        explain_layer: str | torch.nn.Module | None = None, resize_to: int | None = None,
        preset: str | DetectorConfig | None = None, name: str = "custom", factory: str | None = None,
        factory_kwargs: dict | None = None, device: str | None = None,
    ) -> Detector:
        """A detector around any classifier that maps images to logits: a ``torch.nn.Module``, a
        ``torch.export`` program or a TorchScript module. It is uncalibrated: :meth:`calibrate` it on clean
        images, then :meth:`save` it as a bundle that :meth:`load` reads back.

        ``input_size``, ``channels``: the square input the network takes (1 = greyscale, 3 = RGB); images are
        floats in [0, 1], and ``normalize`` = (mean, std) per channel is applied inside the model when given.
        ``resize_to``: resize photos to this short side and centre-crop ``input_size`` (torchvision's
        preprocessing; None: images must come at the input size). ``explain_layer``: Grad-CAM's layer (a name or
        the module; default the last ``Conv2d``). ``preset``: ``digits``, ``photos`` (default: digits for one
        channel, photos for three) or a :class:`DetectorConfig`. ``factory``: ``package.module:callable`` that
        builds ``net``'s architecture (called with ``factory_kwargs``), so that a bundle can rebuild a plain module
        from its state dict. ``name``: the name requests pick the detector by."""
        from pipeline.presets import preset as named_preset  # presets import the config, which this module imports

        source = source_of(net, factory, factory_kwargs)
        if isinstance(net, torch.export.ExportedProgram):
            net = net.module()
        model = wrap_network(net, name=check_detector_name(name), input_size=input_size, channels=channels,
                             normalize=normalize, explain_layer=explain_layer, resize_to=resize_to, source=source)
        if device:
            model.to(device)
        if preset is None:
            preset = "digits" if channels == 1 else "photos"
        return cls(model, preset if isinstance(preset, DetectorConfig) else named_preset(preset))

    @classmethod
    def load(cls, folder: str | Path, weights: str | Path | None = None, device: str | None = None,
             trust_code: bool = False, digest: str | None = None) -> Detector:
        """The detector a bundle folder holds (:meth:`save`, ``explainer calibrate --out``; docs/bundle.md).
        ``weights``: a built-in model's weights file (a user's model carries its own). ``trust_code``: load a
        bundle whose network is code (a Python callable it names, a torch.export program, a TorchScript module):
        only for bundles from a source you trust. ``digest``: ``sha256:HEX`` of the one bundle this caller
        accepts (:func:`pipeline.bundle_digest`); any other is refused."""
        return cls(*load_bundle(folder, weights=weights, device=device, trust_code=trust_code, digest=digest))

    @property
    def config(self) -> DetectorConfig:
        return self.decider.config

    @property
    def calibration(self) -> Calibration | None:
        return self.decider.calibration

    @calibration.setter
    def calibration(self, calibration: Calibration | None) -> None:
        self.decider.calibration = calibration

    @property
    def call_batch(self) -> int:
        """Images one model call of this detector should take (:func:`images_per_call` of its input)."""
        return images_per_call(self.model.channels, self.model.size, self.model.size)

    @property
    def fpr(self) -> float | None:
        """The operating point decisions are made at, as the calibration's target FPR (None: its default)."""
        return self.decider.fpr

    def use_operating_point(self, fpr: float | None) -> Detector:
        """Decide at the calibration's threshold for target FPR ``fpr`` from now on (None: its default one);
        refused, naming the points it holds, when the calibration has none for ``fpr``. Returns the detector."""
        self.decider.use_operating_point(fpr)
        return self

    def save(self, folder: str | Path) -> Path:
        """Write this detector as a bundle (docs/bundle.md): its config, its calibration (with the transplant's
        host images) and its network, or how to load it. Loading it runs no pickled code."""
        return save_bundle(self.model, self.config, self.calibration, folder)

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
        return denoise_prepared(x, self.config.nlm, workers)

    def explain_pair(self, x: np.ndarray, xd: np.ndarray) -> Explained:
        """Predictions and explanation maps for originals and denoised copies in one batch of 2N images, all
        explaining the class predicted on the original (the model-bound stage; see ``predict_and_explain``),
        then the configured ``model`` signals of the originals (:mod:`pipeline.signals`): a median-filtered or
        inpainted copy classified once more, the activation norm read from the prediction pass, the transplant
        onto the calibration's hosts (skipped before a calibration picked them).

        Safe to call from several threads at once (the Serve Explainer overlaps batches): gradient-only methods
        share nothing but the read-only weights; hook-based ones, and any method when a configured signal hooks
        the model (its hook sits on the shared model), are serialised on the model's lock (shared by every
        Detector of that model)."""
        hooked = self.config.method not in GRADIENT_ONLY_METHODS or any(
            SIGNALS[name].hook is not None for name in self.config.model_signals())
        x, xd = (pixels_to_float(a) if a.dtype == np.uint8 else a for a in (x, xd))  # pixels: the same floats
        with self.model.hooks_lock if hooked else nullcontext():
            return self._explain_pair(x, xd)

    def model_pass(self, x: np.ndarray, xd: np.ndarray) -> ModelPass:
        """The prediction and explanation pass over originals ``x`` and denoised copies ``xd`` (floats), with what
        the configured ``model`` signals' hooks kept of it: what those signals are computed on. Takes no lock:
        :meth:`explain_pair` is the thread-safe way in."""
        both = torch.from_numpy(np.concatenate([x, xd])).to(self.model.device).contiguous(
            memory_format=torch.channels_last)
        with ExitStack() as stack:
            captured = {name: stack.enter_context(SIGNALS[name].hook(self.model))
                        for name in self.config.model_signals() if SIGNALS[name].hook is not None}
            probs, attr = predict_and_explain(self.model.net, both, len(x), self.config.method, self.config.explain,
                                              self.model.gradcam_layer)
        maps = np.ascontiguousarray(attr.float().cpu().numpy())
        return ModelPass(model=self.model, x=x, both=both, probs=probs, maps=maps, captured=captured,
                         hosts=lambda: None if self.hosts is None else self._hosts_on_device())

    def _explain_pair(self, x: np.ndarray, xd: np.ndarray) -> Explained:
        batch = self.model_pass(x, xd)
        signals = {}
        for name in self.config.model_signals():
            values = SIGNALS[name].compute(batch, self.config.params(name))
            if values is not None:
                signals[name] = values
        return Explained(probs=batch.probs.cpu().numpy(), maps=batch.maps, signals=signals)

    def host_rows(self, n: int) -> np.ndarray:
        """Which of ``n`` clean calibration images :meth:`calibrate` makes the transplant's hosts (none when the
        transplant is off). An evaluation keeps them out of what its attacker trains on, as an operator keeps
        them private."""
        if not self.config.uses("transplant_gain"):
            return np.zeros(0, dtype=int)
        return pick_hosts(n, self.config.params("transplant_gain").hosts)

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
        """Per-image classes and signals (:meth:`pipeline.decision.Decider.measure`)."""
        return self.decider.measure(explained)

    def decide(self, explained: Explained, rule: str | None = None, return_maps: bool = False,
               fpr: float | None = None) -> DetectionResult:
        """Entropy and decision, the CPU stage after explanation (:meth:`pipeline.decision.Decider.decide`)."""
        return self.decider.decide(explained, rule, return_maps, fpr)

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

    def check_operating_points(self, clean_images: object, batch_size: int = 256,
                               progress=None) -> list[PointCheck]:
        """Whether each operating point of the calibration still holds on these clean images (a site's own
        cameras): realised FPR and its 95% interval per point (:func:`pipeline.calibration.check_points`)."""
        if self.calibration is None:
            raise ValueError(f"detector {self.model.name} has no calibration to check: calibrate it first")
        scores = self.calibration.score(self.analyse_many(clean_images, batch_size, progress))
        return check_points(self.calibration, scores)

    def calibrate(
        self, clean_images: np.ndarray, target_fpr: float = 0.05, images: str = "", batch_size: int = 256,
        progress=None, confidence: float | None = None, folds: int | None = None, fprs: tuple[float, ...] = (),
        drop_unsupported: bool = False, combine: str = "max", signal_weights: dict[str, float] | None = None,
        groups: object = None,
    ) -> Calibration:
        """Fit the calibrated rule on clean images only; sets and returns the calibration. ``confidence``: set
        the threshold so that the target FPR holds with that confidence, not just in expectation. ``folds``:
        cross-fit the CDFs and the threshold over that many folds (small sets; ``fit_calibration``). ``fprs``:
        more operating points beside ``target_fpr`` (the default one), e.g. (0.01, 0.001); ``drop_unsupported``:
        leave out those too few images support rather than refuse (``fit_calibration``). ``combine``: "max"
        or "sum" of the signals' tail scores, each times its entry in ``signal_weights`` (absent: 1; the presets'
        choices: :func:`pipeline.presets.preset_scoring`). ``groups``: a label per image (its camera or source):
        each point then holds on every group large enough for it (``fit_calibration``).

        With the transplant on, its ``hosts`` parameter of the images (spread over the list) become its hosts:
        they are kept out of the fit (a host pasted onto itself would not move) and stored in the calibration."""
        hosts, before = None, (self.hosts, self._host_tensors)
        if self.config.uses("transplant_gain"):
            chosen = self.host_rows(len(clean_images))
            if groups is not None:
                groups = np.delete(np.asarray(groups), chosen)
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
        previous = self.calibration
        try:
            self.calibration = None  # measured as they come: a fitted signal's vectors, not an old state's values
            s = self.analyse_many(clean_images, batch_size, progress)
            calibration = fit_calibration(
                s, target_fpr, model=self.model.name, method=self.config.method, entropy=self.config.entropy,
                images=images or f"{len(clean_images)} clean images", config=self.config.to_dict(),
                use=tuple(self.config.signals), confidence=confidence, folds=folds, fprs=fprs,
                drop_unsupported=drop_unsupported, combine=combine, signal_weights=signal_weights,
                groups=groups,
            )
        except Exception as e:
            self.hosts, self._host_tensors = before  # the detector stays as it was
            self.calibration = previous
            if hosts is not None:
                e.add_note(f"{len(hosts)} of the clean images were kept out as the transplant's hosts")
            raise
        self.calibration = calibration
        if hosts is not None:
            self.calibration.hosts = encode_hosts(hosts)
        return self.calibration
