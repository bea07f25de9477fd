"""Explanation-guided occlusion: inpaint the most relevant part of each image, so its prediction can be re-checked.

NLM removes noise-like perturbations but not a patch: a patch is local, and it is where the explanation of a
patched image points. Removing the top ``fraction`` of the relevance (OpenCV's Telea inpainting fills it from
the surroundings) and classifying again shows whether that small region alone made the decision — the idea of
SentiNet (Chou et al., 2020), here driven by the same map the entropy is measured on.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.threads import map_chunks

INPAINT_RADIUS = 5


def top_relevance_masks(maps: np.ndarray, fraction: float) -> np.ndarray:
    """uint8 masks (N, H, W), 1 on the ``fraction`` of pixels with the largest |relevance| (summed over channels).
    Only pixels with some relevance count: where fewer than that fraction have any (a ReLU'd Grad-CAM map can be
    zero over most of the image), the mask is those pixels, not every pixel tied at zero."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"occlusion fraction must be in (0, 1), got {fraction}")
    relevance = np.abs(maps).sum(1).reshape(len(maps), -1)
    k = max(1, int(round(fraction * relevance.shape[1])))
    cut = np.partition(relevance, -k, axis=1)[:, -k][:, None]
    return ((relevance >= cut) & (relevance > 0)).reshape(len(maps), *maps.shape[2:]).astype(np.uint8)


def occlude_top_relevance(images: np.ndarray, maps: np.ndarray, fraction: float, workers: int | None = None
                          ) -> np.ndarray:
    """uint8 (N, H, W, C) images with the top ``fraction`` of each map's relevance inpainted (Telea), one chunk of
    the batch per worker thread (default: one per core; OpenCV releases the GIL)."""
    if len(maps) != len(images):
        raise ValueError(f"{len(images)} images but {len(maps)} maps")
    masks = top_relevance_masks(maps, fraction)
    out = np.empty_like(images)

    def inpaint(idx: np.ndarray, dest: np.ndarray) -> None:
        for j, i in enumerate(idx):
            filled = cv2.inpaint(np.ascontiguousarray(images[i]), masks[i], INPAINT_RADIUS, cv2.INPAINT_TELEA)
            dest[j] = filled.reshape(images[i].shape)

    map_chunks(inpaint, np.arange(len(images)), out, workers)
    return out
