"""Turn a batch of decoded wire requests into verdict dicts with as few detector calls as possible."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import Decider, Detector, InputError, keep_allocations_mapped, load_decider, pretrained_decider
from worker import wire

VERDICT_FIELDS = (
    "is_adversarial",
    "score",
    "threshold",
    "fpr",
    "entropy_original",
    "entropy_denoised",
    "predicted_class",
    "confidence",
    "prediction_shift",
    "map_shift",
    "rule",
)


def _model_name(detector: Any) -> str:
    model = getattr(detector, "model", None)
    return getattr(model, "name", None) or "mnist"


def _hwc(image: np.ndarray) -> np.ndarray:
    """One image as H×W×C (a greyscale H×W gains its channel axis), so that a stack of them is unambiguous."""
    return image[:, :, None] if image.ndim == 2 else image


def _resizes(detector: Any) -> bool:
    """Whether the detector's model resizes what it is given (photos), so images of any size batch together."""
    return getattr(getattr(detector, "model", None), "resize_to", None) is not None


def error_verdict(req: wire.Request, message: str, method: str | None = None) -> dict:
    """A verdict that carries ``error`` and no decision (every decision field is None)."""
    return {
        "v": wire.VERSION,
        "id": req.id,
        "model": req.model,
        "method": method,
        **dict.fromkeys(VERDICT_FIELDS),
        "error": message,
    }


def _verdicts(
    detector: Any, reqs: Sequence[wire.Request], images: np.ndarray | list[np.ndarray], with_maps: bool
) -> list[dict]:
    res = detector.detect(images, return_maps=with_maps)
    method = detector.config.method
    # the detector's configured signals without a verdict field of their own (median_shift, occlusion_shift, ...),
    # so that a subscriber sees every input of the score; entropy_change is the difference of two that have one
    extra = {k: v.tolist() for k, v in res.signals.items() if k not in VERDICT_FIELDS and k != "entropy_change"}
    out = []
    for i, req in enumerate(reqs):
        v = {
            "v": wire.VERSION,
            "id": req.id,
            "model": req.model,
            "method": method,
            "is_adversarial": bool(res.is_adversarial[i]),
            "score": float(res.score[i]),
            "threshold": float(res.threshold),
            "fpr": res.fpr,
            "rule": res.rule,
            "entropy_original": float(res.signals["entropy_original"][i]),
            "entropy_denoised": float(res.signals["entropy_denoised"][i]),
            "predicted_class": int(res.predicted_class[i]),
            "confidence": float(res.confidence[i]),
            "prediction_shift": float(res.signals["prediction_shift"][i]),
            "map_shift": float(res.signals["map_shift"][i]),
        }
        if extra:
            v["signals"] = {k: vals[i] for k, vals in extra.items()}
        if req.heatmap and res.maps is not None:
            v["heatmap"] = wire.heatmap_field(res.maps[i])
        out.append(v)
    return out


def detect_requests(
    detectors: Any, requests: Sequence[wire.Request], max_batch: int | None = None
) -> list[dict]:
    """One verdict dict per request, in order. ``detectors`` is a ``pipeline.Detector`` or a mapping from
    model name to Detector. Requests are grouped by model and each group is one ``detect`` call (split in
    chunks of ``max_batch`` if given). A model of fixed input size (digits) groups by image shape too, since
    its images are stacked as they are; a photo model resizes every photo to its input, so photos of any size
    share one batch (cameras send JPEGs of many sizes: grouped by shape, each would be a batch of one).

    Every image is checked first (``detector.check``: layout, channels, size, without converting a pixel), so a
    bad image gets its ``{"error": ...}`` verdict before any batch is built and never breaks up the others'.
    Images are stacked as (N, H, W, C), so no batch is mistaken for one image of another layout. If a group
    still raises ``InputError`` its images are retried one at a time. Other exceptions propagate (the batch
    stays pending in Redis and is retried)."""
    table: Mapping[str, Any] = (
        detectors if isinstance(detectors, Mapping) else {_model_name(detectors): detectors}
    )
    out: list[dict | None] = [None] * len(requests)
    groups: dict[tuple[str, tuple[int, ...] | None], list[int]] = defaultdict(list)
    for i, req in enumerate(requests):
        if req.model not in table:
            out[i] = error_verdict(req, f"unknown model {req.model!r}; this worker serves {sorted(table)}")
            continue
        det = table[req.model]
        try:
            det.check(req.image)
        except InputError as e:
            out[i] = error_verdict(req, str(e), det.config.method)
            continue
        groups[(req.model, None if _resizes(det) else _hwc(req.image).shape)].append(i)
    for (model, shape), idx in groups.items():
        det = table[model]
        step = max_batch or len(idx)
        for start in range(0, len(idx), step):
            chunk = idx[start : start + step]
            reqs = [requests[i] for i in chunk]
            with_maps = any(r.heatmap for r in reqs)
            images = [_hwc(r.image) for r in reqs] if shape is None else np.stack([_hwc(r.image) for r in reqs])
            try:
                verdicts = _verdicts(det, reqs, images, with_maps)
            except InputError:
                verdicts = []
                for r in reqs:
                    try:
                        verdicts += _verdicts(det, [r], _hwc(r.image)[None], r.heatmap)
                    except InputError as e:
                        verdicts.append(error_verdict(r, str(e), det.config.method))
            for i, v in zip(chunk, verdicts, strict=True):
                out[i] = v
    return out  # type: ignore[return-value]


def detector_ref(given: str, trust_code: bool = False, fpr: float | None = None) -> dict:
    """One served detector as the CLI, the Serve config and the standalone worker name it: a built-in model name,
    or a bundle path, optionally pinned (``PATH@sha256:HEX``, :func:`pipeline.split_pin`), as the ref
    :func:`load_served_detectors` takes. ``fpr``: its operating point (None: the calibration's default)."""
    from pipeline import BUILTIN_DETECTORS, split_pin

    point = {} if fpr is None else {"fpr": fpr}
    if given in BUILTIN_DETECTORS:
        return {"model": given, **point}
    path, digest = split_pin(given)
    return {"bundle": path, "digest": digest, "trust_code": trust_code, **point}


def load_served_detectors(refs: list[dict], device: str | None = None) -> dict[str, Detector]:
    """The detectors a worker serves, by the name requests pick them with: ``{"bundle": path, "digest": pin or
    None, "trust_code": bool}`` (:func:`detector_ref`) or ``{"model": name, "weights", "calibration"}`` each
    (``worker.serve_app.AppArgs.detector_refs``, the standalone worker), with ``"fpr"``: the operating point it
    decides at (None: its calibration's default). The process also keeps its batches' memory mapped
    (pipeline.runtime). A served detector decides with its calibration, so one without, or without the
    operating point asked for, is refused here, when the worker starts."""
    keep_allocations_mapped()

    def load(ref: dict) -> Detector:
        if "bundle" in ref:
            return Detector.load(ref["bundle"], device=device, trust_code=ref.get("trust_code", False),
                                 digest=ref.get("digest"))
        return Detector.from_pretrained(ref["model"], weights=ref.get("weights"), calibration=ref.get("calibration"),
                                        device=device)

    return _served(refs, load)


def load_served_deciders(refs: list[dict]) -> dict[str, Decider]:
    """What the stages that never run the model need of the same detectors (the refs of
    :func:`load_served_detectors`): each one's config, calibration and operating point, its network not loaded."""
    def load(ref: dict) -> Decider:
        if "bundle" in ref:
            return load_decider(ref["bundle"], digest=ref.get("digest"))
        return pretrained_decider(ref["model"], ref.get("calibration"))

    return _served(refs, load)


def _served(refs: list[dict], load: Callable[[dict], Detector | Decider]) -> dict:
    """``load`` of each ref by its name, checked as every stage checks them: names unique, each calibrated, each
    at its operating point."""
    out: dict = {}
    for ref in refs:
        det = load(ref)
        name = det.decider.name if isinstance(det, Detector) else det.name
        if name in out:
            raise ValueError(f"two served detectors are named {name!r}: requests pick a detector by name, so each "
                             "needs its own (explainer calibrate --name)")
        if det.calibration is None:
            raise ValueError(f"detector {name!r} has no calibration, and a served detector decides with it: "
                             f"calibrate it (explainer calibrate --model {name} --images-dir CLEAN --out BUNDLE) "
                             "and serve the bundle")
        try:
            det.use_operating_point(ref.get("fpr"))
        except ValueError as exc:
            raise ValueError(f"detector {name!r}: {exc}") from None
        out[name] = det
    return out