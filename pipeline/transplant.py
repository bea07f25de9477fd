"""Explanation-guided transplant: paste the most relevant part of each image onto clean host images.

This is the second half of SentiNet (Chou et al., 2020); :mod:`pipeline.occlude` is the first half. A universal
patch carries its decision with it. Pasted at the same place onto clean photos of other things, it pulls them
towards the class it made the suspect photo look like. The salient region of a clean photo (a part of its
object) rarely does that to a photo of something else.

The ``transplant_gain`` signal is the mean over K hosts of the rise in the host's probability of the suspect's
predicted class when the top ``fraction`` of the suspect's map is pasted onto it. It is a rise, not the level
after the paste, so that a clean photo of a host's own class does not look suspicious.

The hosts are clean photos from the calibration set. :meth:`pipeline.Detector.calibrate` keeps them out of the
fit and stores them, PNG-encoded, in the calibration file, so that a saved detector scores as it was calibrated.
It was chosen on the even photos only (reports/validation/imagenet_transplant_probe.md).
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
import torch

from pipeline.imagecost import decode_cost
from pipeline.occlude import top_relevance_masks

PASTE_BATCH = 64  # pasted images per forward pass


def pick_hosts(n: int, k: int) -> np.ndarray:
    """Indices of ``k`` hosts spread evenly over ``n`` calibration images (sample lists are often class-ordered)."""
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= hosts < calibration images, got {k} hosts of {n} images")
    return np.linspace(0, n - 1, k).round().astype(int)


def encode_hosts(images: np.ndarray) -> list[str]:
    """uint8 (K, H, W, C) RGB hosts as base64 PNG strings (lossless, for the calibration's JSON)."""
    out = []
    for im in images:
        ok, png = cv2.imencode(".png", np.ascontiguousarray(im[..., ::-1]) if im.shape[-1] == 3 else im)
        if not ok:
            raise ValueError("could not PNG-encode a host image")
        out.append(base64.b64encode(png.tobytes()).decode("ascii"))
    return out


MAX_HOSTS = 32  # transplant hosts a calibration may hold: the preset uses 8


def decode_hosts(encoded: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """The inverse of :func:`encode_hosts`: uint8 (K, H, W, C), each host of ``shape`` (the model's input). A
    calibration may come from a bundle someone sent, so its hosts are bounded before any is decoded: at most
    ``MAX_HOSTS``, each an 8-bit PNG of exactly ``shape`` with a sound chunk table. Decoding them costs at most
    ``MAX_HOSTS`` model inputs."""
    if not isinstance(encoded, list) or len(encoded) > MAX_HOSTS:
        raise ValueError(f"the calibration file holds over {MAX_HOSTS} host images (or not a list of them)")
    h, w, c = shape
    images = []
    for s in encoded:
        if not isinstance(s, str) or len(s) > 4 * (h * w * c + 4096):  # base64 of a PNG no bigger than its pixels
            raise ValueError("a host image in the calibration file is not a PNG of the model's input size")
        data = base64.b64decode(s)
        cost = decode_cost(data)
        if cost is None or cost.format != "png":
            raise ValueError("a host image in the calibration file is not a PNG")
        if (cost.height, cost.width, cost.bits, cost.max_channels) != (h, w, 8, c):
            raise ValueError(f"a host image in the calibration file is a {cost.width}×{cost.height} PNG of "
                             f"{cost.max_channels} {cost.bits}-bit channels: hosts are 8-bit "
                             f"{'grey' if c == 1 else 'RGB'} {w}×{h} images (the model's input)")
        if cost.problem:
            raise ValueError(f"a host image in the calibration file: {cost.problem}")
        im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if im is None:
            raise ValueError("a host image in the calibration file is not a valid PNG")
        images.append(im[..., ::-1] if im.ndim == 3 else im[..., None])
    return np.ascontiguousarray(np.stack(images))


def transplant_gain(net: torch.nn.Module, x: torch.Tensor, predicted: torch.Tensor, maps: np.ndarray,
                    hosts: torch.Tensor, host_probs: torch.Tensor, fraction: float) -> np.ndarray:
    """(N,) mean rise in the hosts' probability of each image's predicted class when the top ``fraction`` of its
    map is pasted onto them.

    ``x``: the images (N, C, H, W) in [0, 1] on the model's device, ``predicted`` their classes (N,) and ``maps``
    their attribution maps (N, C', H, W); ``hosts``: (K, C, H, W) on the same device, ``host_probs`` (K, classes)
    their clean softmax outputs. The N × K pasted images go through the model under inference mode,
    ``PASTE_BATCH`` at a time."""
    n, k = len(x), len(hosts)
    if len(maps) != n or len(predicted) != n:
        raise ValueError(f"{n} images but {len(maps)} maps and {len(predicted)} predictions")
    masks = torch.from_numpy(top_relevance_masks(maps, fraction)).to(x.device, torch.bool)[:, None]  # (N,1,H,W)
    suspect = torch.arange(n, device=x.device).repeat_interleave(k)
    host = torch.arange(k, device=x.device).repeat(n)
    gains = torch.empty(n * k, device=x.device)
    with torch.inference_mode():
        for s in range(0, n * k, PASTE_BATCH):
            i, j = suspect[s : s + PASTE_BATCH], host[s : s + PASTE_BATCH]
            pasted = torch.where(masks[i], x[i], hosts[j]).contiguous(memory_format=torch.channels_last)
            probs = torch.softmax(net(pasted).float(), dim=1)
            cls = predicted[i]
            gains[s : s + PASTE_BATCH] = probs[torch.arange(len(i), device=x.device), cls] - host_probs[j, cls]
    return gains.view(n, k).mean(1).cpu().numpy().astype(np.float64)
