"""Turn what users hand us into one uint8 batch (N, H, W, C), or raise an :class:`InputError` that says why.

Accepted: uint8 arrays H×W, H×W×C, N×H×W, N×H×W×C; float arrays or tensors in [0, 1] of the same shapes or
N×C×H×W (torch layout); encoded PNG/JPEG bytes or files. Floats are kept exact (not rounded) by
:func:`to_float_batch` so that small adversarial perturbations survive into the first explanation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ImageTooLargeError, InputError
from pipeline.imagecost import PNG_SIGNATURE, cost_problem, decode_cost

MAX_PIXELS = 4096 * 4096
# what decoding one image file may allocate, pixels and decoder buffers together (pipeline.imagecost): a 4096² RGB
# photo is 48 MiB, a progressive 4:2:0 one 96 MiB with its coefficients
MAX_DECODE_BYTES = 128 * 1024 * 1024


def decode_image(data: bytes, source: str = "image", max_bytes: int = MAX_DECODE_BYTES) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 H×W (a grey image) or H×W×3 (RGB), or raise an :class:`InputError` that
    says why. What the decode costs is read first (:func:`pipeline.imagecost.decode_cost`): any other format, a
    JPEG of more than 8 bits, a broken chunk table, a decompression bomb, too many JPEG scans, more than
    ``MAX_PIXELS`` pixels, or more than ``max_bytes`` of pixels and decoder buffers is refused before OpenCV
    runs. 16-bit PNGs are decoded straight to 8 bits and alpha is dropped as it decodes (no 16-bit or 4-channel
    copy is ever made); the EXIF orientation is ignored, as for every image on the stream."""
    import cv2

    if not data:
        raise InputError(f"{source}: empty file")
    cost = decode_cost(data)
    if cost is None and bytes(data[:8]) == PNG_SIGNATURE:
        raise InputError(f"{source}: truncated PNG (no readable IHDR header)")
    if cost is None:
        raise InputError(f"{source}: not a decodable PNG/JPEG image (another format, corrupt or truncated)")
    if cost.height == 0 or cost.width == 0:
        raise InputError(f"{source}: zero-size {cost.format.upper()} image {cost.height}×{cost.width}")
    if cost.height * cost.width > MAX_PIXELS:
        raise ImageTooLargeError(f"{source}: image too large: {cost.height}×{cost.width} exceeds {MAX_PIXELS} "
                                 "pixels")
    if cost.format == "jpeg" and cost.bits != 8:
        raise InputError(f"{source}: a {cost.bits}-bit JPEG: only 8-bit JPEGs are accepted")
    grey = cost.channels == 1
    if cost.problem:
        raise InputError(f"{source}: {cost.problem}")
    if problem := cost_problem(cost, max_bytes, 1 if grey else 3):
        raise ImageTooLargeError(f"{source}: {problem}")
    flags = (cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if img is None:
        raise InputError(f"{source}: not a decodable PNG/JPEG image (corrupt, truncated or another format)")
    return img if img.ndim == 2 else np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB


def read_image_file(path: str | Path) -> np.ndarray:
    """Read one PNG/JPEG file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return decode_image(path.read_bytes(), str(path))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(paths: Iterable[str | Path], split: str = "all") -> list[Path]:
    """The PNG/JPEG files among ``paths``, a folder standing for every image under it (recursively, sorted), in
    the order given. ``split``: ``all``, or ``even`` / ``odd`` positions of that list (a calibration half and an
    evaluation half of one folder). A path that does not exist is an error."""
    if split not in ("all", "even", "odd"):
        raise ValueError(f"split must be all, even or odd, got {split!r}")
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif given.exists():
            found.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found if split == "all" else found[0 if split == "even" else 1 :: 2]


def _to_numpy(images: object) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise InputError("empty batch: no images given")
        arrays = [_to_numpy(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise InputError(f"images in one batch must share a shape, got {sorted(shapes)}")
        return np.stack(arrays)
    if isinstance(images, np.ndarray):
        return images
    raise InputError(f"expected a numpy array, torch tensor or list of them, got {type(images).__name__}")


def _as_nhwc(arr: np.ndarray, channels: int) -> np.ndarray:
    """Reshape to (N, H, W, C) given the model's channel count; accepts N×C×H×W too."""
    # a trailing dimension of at most 4 is a channel axis (no real image is 4 pixels wide)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] <= 4 else arr[..., None]  # H×W×C or N×H×W
    elif arr.ndim == 4:
        if arr.shape[-1] > 4 and arr.shape[1] <= 4:
            arr = arr.transpose(0, 2, 3, 1)  # N×C×H×W -> N×H×W×C
    else:
        raise InputError(f"image array must have 2 to 4 dimensions (H×W[×C] or N×H×W[×C]), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError("empty batch: no images given")
    _check_image(*arr.shape[1:], channels)
    c = arr.shape[-1]
    if c == 4:
        arr, c = arr[..., :3], 3
    if c == channels:
        return arr
    return np.repeat(arr, 3, axis=-1)  # greyscale photo for an RGB model (the only other layout _check_image lets by)


def _check_image(h: int, w: int, c: int, channels: int) -> None:
    """The checks every image's size and channel count must pass, for a batch or one image alone."""
    if h == 0 or w == 0:
        raise InputError(f"zero-size image: shape {(h, w)}")
    if h * w > MAX_PIXELS:
        raise InputError(f"image too large: {h}×{w} exceeds {MAX_PIXELS} pixels")
    if c > 4 or not (c == channels or (c == 4 and channels == 3) or (c == 1 and channels == 3)):
        raise InputError(f"wrong channel count: the model takes {channels}-channel images, got {c} channels")


def image_layout(image: np.ndarray, channels: int) -> tuple[int, int, int]:
    """(H, W, C) of one H×W or H×W×C image, after the checks :func:`to_float_batch` makes of its layout, size and
    channels, without converting a pixel: what a stream worker asks of each image before it batches any."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise InputError(f"one image must be H×W or H×W×C, got shape {arr.shape}")
    if arr.dtype != np.uint8 and arr.dtype.kind in "iub":
        raise InputError(f"integer images must be uint8, got {arr.dtype}")
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise InputError(f"unsupported image dtype {arr.dtype}")
    h, w = arr.shape[:2]
    c = arr.shape[2] if arr.ndim == 3 else 1
    _check_image(h, w, c, channels)
    return h, w, c


def to_uint8_batch(images: object, channels: int) -> np.ndarray:
    """Validate and convert to uint8 (N, H, W, C); floats in [0, 1] are rounded to the nearest of 256 levels.
    For photos, which are resized anyway: a uint8 photo is never blown up to float at its full size."""
    arr = _to_numpy(images)
    if arr.dtype == np.uint8:
        return _as_nhwc(arr, channels)
    return np.round(to_float_batch(arr, channels) * 255).astype(np.uint8)


def to_uint8_hwc(x: np.ndarray) -> np.ndarray:
    """A prepared float batch (N, C, H, W) in [0, 1] as the uint8 (N, H, W, C) images OpenCV takes."""
    return np.ascontiguousarray(np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1))


def pixels_to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any layout) as float32 in [0, 1]: the one conversion every path uses, so that a batch
    converted early (``Detector.prepare``) and one passed on as pixels and converted late agree bit for bit."""
    out = pixels.astype(np.float32)
    out /= 255.0  # in place: one float copy of the batch, not two
    return out


def to_float_batch(images: object, channels: int) -> np.ndarray:
    """Validate and convert to float32 (N, H, W, C) in [0, 1]; uint8 is divided by 255, floats kept exact."""
    arr = _to_numpy(images)
    if arr.dtype == np.uint8:
        return pixels_to_float(_as_nhwc(arr, channels))
    if arr.dtype.kind == "f":
        arr = _as_nhwc(arr.astype(np.float32, copy=False), channels)
        if not np.isfinite(arr).all():
            raise InputError("image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return arr
    if arr.dtype.kind in "iub":
        raise InputError(f"integer images must be uint8, got {arr.dtype}")
    raise InputError(f"unsupported image dtype {arr.dtype}")
