"""In-process performance measurements: the floor, the detector's throughput, its stages, batch sizes.

The floor is the raw work the configured explanation needs, timed with plain torch in the same run: for IG with
k steps, 2k forward+backward passes per image (original and denoised copy), in one batch. Every figure is a
ratio against that floor or against a peer measured in the same process, never an absolute promise.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.detector import Detector
from pipeline.explain import passes_per_image
from pipeline.signals import SIGNALS


def synchronize(device: torch.device | str) -> None:
    """Wait for the kernels queued on ``device``: CUDA runs asynchronously, and a timing must include them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def floor_throughput(
    det: Detector, batch: int, repeat: int = 3, channels_last: bool = False, images: int | None = None,
    with_checks: bool = False,
) -> dict:
    """Images/s of the bare forward+backward passes the explanation needs (2 x passes per map per image).

    Plain torch: a copy of the model in the default (NCHW) layout, as torchvision or a user's training code
    leaves it. ``channels_last=True`` times the layout the detector itself runs in, a stricter peer.
    ``images``: time this many images per measurement (batches of ``batch``), so that the floor and the
    detector are timed over windows of the same length on a machine whose speed drifts (default: one batch).
    ``with_checks=True`` adds the inference-only forward passes per image that the configured checks make beyond
    the explanation (one each for the median check and occlusion, one per host for the transplant): the floor
    of everything the configured detector runs."""
    passes = passes_per_image(det.config.method, det.config.explain)
    rows = 2 * batch * passes
    c, s = det.model.channels, det.model.size
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(det.model.net).to(memory_format=layout)
    x = torch.rand(rows, c, s, s, device=det.model.device).contiguous(memory_format=layout).requires_grad_(True)
    checks = inference_passes_per_image(det) if with_checks else 0
    xc = torch.rand(batch, c, s, s, device=det.model.device).contiguous(memory_format=layout)

    def step() -> None:
        out = net(x)
        torch.autograd.grad(out[:, 0].sum(), x)
        for _ in range(checks):
            with torch.inference_mode():
                net(xc)

    steps = max(1, -(-(images or batch) // batch))

    def run() -> None:
        for _ in range(steps):
            step()
        synchronize(det.model.device)

    seconds = best_of(run, repeat)
    return {"passes_per_image": 2 * passes, "inference_passes_per_image": checks, "batch": batch,
            "images_per_s": steps * batch / seconds, "layout": "channels_last" if channels_last else "NCHW"}


def inference_passes_per_image(det: Detector) -> int:
    """Inference-only forward passes per image that ``det``'s checks add to the explanation's passes."""
    return sum(SIGNALS[name].forward_passes(det.config.params(name)) for name in det.config.signals)


def stage_times(det: Detector, images: np.ndarray, repeat: int = 3) -> dict[str, float]:
    """Milliseconds per image of each stage on one batch: prepare, denoise, explain (forward + Captum),
    entropy + decision."""
    n = len(images)
    x = det.prepare(images)
    xd = det.denoise(x)
    explained = det.explain_pair(x, xd)
    return {
        "prepare": 1000 * best_of(lambda: det.prepare(images), repeat) / n,
        "denoise": 1000 * best_of(lambda: det.denoise(x), repeat) / n,
        "explain": 1000 * best_of(lambda: det.explain_pair(x, xd), repeat) / n,
        "entropy_and_decision": 1000 * best_of(lambda: det.decide(explained), repeat) / n,
    }


def signal_times(det: Detector, images: np.ndarray, repeat: int = 3) -> dict[str, float]:
    """Milliseconds per image of each configured signal on one batch, measured on what the detector hands it
    (the prediction pass and maps of ``images`` and their denoised copies): what each signal adds to the
    explanation stage (``model`` signals) or to the decision (``maps`` signals)."""
    from pipeline.signals import MapsPass

    n = len(images)
    x = det.prepare(images)
    model_pass = det.model_pass(x, det.denoise(x))
    wanted = det.config.model_signals()
    probs, maps = model_pass.probs, model_pass.maps
    out = {}
    for name in det.config.signals:
        signal, params = SIGNALS[name], det.config.params(name)
        if name in wanted:
            out[name] = 1000 * best_of(lambda s=signal, p=params: s.compute(model_pass, p), repeat) / n
        else:  # a fresh MapsPass each time: the entropies it caches are part of the cost
            out[name] = 1000 * best_of(lambda s=signal, p=params: s.compute(
                MapsPass(probs=probs.cpu().numpy(), maps=torch.from_numpy(maps), entropy=det.config.entropy), p),
                repeat) / n
    return out


def detector_throughput(det: Detector, images: np.ndarray, batch: int, repeat: int = 3) -> float:
    """Images/s of ``det.detect`` over ``images`` in batches of ``batch``."""

    def run() -> None:
        for i in range(0, len(images), batch):
            det.detect(images[i : i + batch])

    return len(images) / best_of(run, repeat)
