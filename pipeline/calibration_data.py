"""Which clean images calibrate which model: even-indexed MNIST test digits, even-indexed ImageNet photos.

The odd-indexed ones stay for evaluation. MNIST's two test halves come from different writers, so the split is
by index parity, never by halves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import load_imagenet_sample, load_test_digits
from pipeline.inputs import read_image_file


def load_photos(paths: list[Path]) -> list[np.ndarray]:
    return [read_image_file(p) for p in paths]


def clean_calibration_images(model: str, images_dir: Path | None = None, n: int | None = None) -> tuple[object, str]:
    """(images, description) of the clean calibration set for ``model``; a user's folder if given."""
    if images_dir is not None:
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        files = files[:n] if n else files
        if not files:
            raise FileNotFoundError(f"no PNG/JPEG images in {images_dir}")
        return _stack(load_photos(files)), f"{len(files)} images from {images_dir}"
    if model == "mnist":
        digits = load_test_digits().parity("even")
        digits = digits.head(n) if n else digits
        first, last = digits.indices[0], digits.indices[-1]
        return digits.images, f"MNIST test digits with even index ({len(digits.images)} images, {first}..{last})"
    rows = load_imagenet_sample()[0::2]
    rows = rows[:n] if n else rows
    return [
        read_image_file(p) for p, _ in rows
    ], f"ImageNet sample photos at even positions in labels.csv ({len(rows)})"


def _stack(images: list[np.ndarray]) -> object:
    shapes = {im.shape for im in images}
    return np.stack(images) if len(shapes) == 1 else images
