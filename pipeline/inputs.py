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

from pipeline.errors import InputError

MAX_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_ANCILLARY_CHUNKS = 64  # chunks other than IHDR/PLTE/IDAT/IEND: each bad one is a libpng warning in the log


def png_chunk_problem(data: bytes | bytearray | memoryview) -> str | None:
    """What is wrong with a PNG's chunk table, or None: walked before anything decodes the file. Every chunk's
    declared length must fit in the bytes that follow it (libpng allocates a chunk's declared length before
    reading it, so a 100-byte file claiming a 2 GiB text chunk would cost 2 GiB), the image must end with IEND
    (bytes after it are allowed), and at most ``MAX_PNG_ANCILLARY_CHUNKS`` ancillary chunks may come."""
    mv = memoryview(data)
    i, n, ancillary = 8, len(mv), 0
    while True:
        if i + 12 > n:
            return "truncated PNG (no IEND chunk)"
        length = int.from_bytes(mv[i : i + 4], "big")
        kind = bytes(mv[i + 4 : i + 8])
        if length > n - i - 12:
            return f"PNG chunk {kind!r} declares {length} bytes but the file holds {n - i - 12} more: corrupt or a " \
                   "decoder bomb"
        if kind == b"IEND":
            return None
        if kind not in (b"IHDR", b"PLTE", b"IDAT"):
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                return f"PNG has over {MAX_PNG_ANCILLARY_CHUNKS} ancillary chunks"
        i += 12 + length


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 H×W or H×W×3 (RGB); a clear error for corrupt or non-image data, and a PNG's
    chunk table checked first (:func:`png_chunk_problem`)."""
    import cv2

    if not data:
        raise InputError(f"{source}: empty file")
    if bytes(data[:8]) == PNG_SIGNATURE and (problem := png_chunk_problem(data)):
        raise InputError(f"{source}: {problem}")
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError(f"{source}: not a decodable PNG/JPEG image (corrupt, truncated or another format)")
    if img.dtype != np.uint8:
        # integer division: the float64 copy of img / 257 was 4× a 16-bit image's own size
        img = (img // 257).astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB
    return img


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
