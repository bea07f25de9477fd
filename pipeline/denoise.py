"""OpenCV non-local means on uint8 images, batched as mosaics across a thread pool (OpenCV releases the GIL).

A call to ``cv2.fastNlMeansDenoising`` has a fixed cost (it rebuilds its weight table and pads the image) that
on a 28×28 digit is about as large as the filtering itself. Each chunk of a batch is therefore filtered in one
call, as a mosaic of tiles: every image padded on its own with the border OpenCV would add
(``BORDER_REFLECT_101``, ``search // 2 + template // 2`` pixels), so no search window or patch crosses from one
tile into another and the result equals the per-image call bit for bit (``tests/test_stages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.threads import map_chunks


@dataclass(frozen=True)
class NLMParams:
    """Parameters of ``cv2.fastNlMeansDenoising[Colored]``: filter strength ``h`` (``h_color`` for chroma),
    patch size ``template`` and search window ``search`` (both odd); ``pre_median``: odd kernel of a median
    filter run before NLM (0: none).

    The defaults are OpenCV's own. The presets (:mod:`pipeline.presets`) set what was chosen on validation: h=50
    with a 3×3 patch and 5×5 window for digits, h=10 with 5×5 / 11×11 for photos (docs/method.md)."""

    h: float = 3.0
    h_color: float = 3.0
    template: int = 7
    search: int = 21
    pre_median: int = 0


def _denoise_one(img: np.ndarray, p: NLMParams) -> np.ndarray:
    """NLM of one (H, W, C) image, returned with the same shape."""
    if img.shape[-1] == 1:
        return cv2.fastNlMeansDenoising(np.ascontiguousarray(img[:, :, 0]), None, p.h, p.template, p.search)[
            :, :, None
        ]
    return cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(img), None, p.h, p.h_color, p.template, p.search)


def _denoise_chunk(chunk: np.ndarray, out: np.ndarray, p: NLMParams) -> None:
    """Denoise ``chunk`` (N, H, W, C) into ``out`` with one OpenCV call on a mosaic of reflect-padded tiles."""
    if p.pre_median:
        chunk = np.stack([cv2.medianBlur(img, p.pre_median).reshape(img.shape) for img in chunk])
    n, h, w, c = chunk.shape
    border = p.search // 2 + p.template // 2
    if n == 1 or border >= min(h, w):  # one image, or too small for a single reflection: no mosaic
        for i, img in enumerate(chunk):
            out[i] = _denoise_one(img, p)
        return
    tiles = np.pad(chunk, ((0, 0), (border, border), (border, border), (0, 0)), mode="reflect")
    th, tw = h + 2 * border, w + 2 * border
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    if rows * cols > n:
        tiles = np.concatenate([tiles, np.zeros((rows * cols - n, th, tw, c), np.uint8)])
    mosaic = tiles.reshape(rows, cols, th, tw, c).transpose(0, 2, 1, 3, 4).reshape(rows * th, cols * tw, c)
    filtered = _denoise_one(mosaic, p).reshape(rows, th, cols, tw, c).transpose(0, 2, 1, 3, 4)
    out[:] = filtered.reshape(rows * cols, th, tw, c)[:n, border : border + h, border : border + w]


def denoise_batch(images: np.ndarray, params: NLMParams = NLMParams(), workers: int | None = None) -> np.ndarray:
    """Denoise uint8 (N, H, W, C) with C in {1, 3}; returns a new uint8 array of the same shape.

    The batch is cut into one contiguous chunk per worker thread, so a batch of small digits costs one task
    per core rather than one per image.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"denoise_batch takes uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    map_chunks(lambda chunk, dest: _denoise_chunk(chunk, dest, params), images, out, workers)
    return out
