"""Real data readers: MNIST idx files, the digits shipped with the package, ImageNet sample photos.

Nothing here downloads: tests and CI run offline. ``SHARED_DATA`` points at ``../shared/data`` beside the
project; every reader also takes an explicit path for a user's own copy.
"""

from __future__ import annotations

import csv
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_DIGITS = ASSETS / "mnist_sample.npz"

MNIST_FILES = {
    "train_images": "train-images-first14262-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (possibly gzipped) idx file into a numpy array, shape from its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data[: int(np.prod(dims))].reshape(dims)


def mnist_dir(root: str | Path | None = None) -> Path:
    """The MNIST folder: ``root`` if given, else ``../shared/data/mnist``; a clear error if absent."""
    folder = Path(root) if root is not None else SHARED_DATA / "mnist"
    if not (folder / MNIST_FILES["test_images"]).exists():
        raise FileNotFoundError(
            f"MNIST idx files not found in {folder} (expected {MNIST_FILES['test_images']} and friends)"
        )
    return folder


def load_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` in {"train", "test"}.

    The training split holds the 14,262 real training images available here, with their labels.
    """
    folder = mnist_dir(root)
    images = read_idx(folder / MNIST_FILES[f"{split}_images"])
    labels = read_idx(folder / MNIST_FILES[f"{split}_labels"]).astype(np.int64)
    return images, labels[: len(images)]


@dataclass(frozen=True)
class Digits:
    """Real MNIST test digits with their labels and their index in the 10,000-image test set."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def parity(self, parity: str) -> Digits:
        """The even-indexed (calibration) or odd-indexed (evaluation) digits."""
        keep = self.indices % 2 == (0 if parity == "even" else 1)
        return Digits(self.images[keep], self.labels[keep], self.indices[keep])

    def head(self, n: int) -> Digits:
        return Digits(self.images[:n], self.labels[:n], self.indices[:n])

    def spread(self, n: int) -> Digits:
        """``n`` digits evenly spaced over the whole set: both halves of the MNIST test set (different writer
        pools, different difficulty) in proportion, unlike ``head``."""
        if n >= len(self.images):
            return self
        keep = np.linspace(0, len(self.images) - 1, n).round().astype(int)
        return Digits(self.images[keep], self.labels[keep], self.indices[keep])


def load_sample_digits() -> Digits:
    """The real test digits shipped inside the package (test indices 0..1999), made by scripts/make_sample.py."""
    with np.load(SAMPLE_DIGITS) as npz:
        return Digits(npz["images"], npz["labels"].astype(np.int64), npz["indices"].astype(np.int64))


def load_test_digits(root: str | Path | None = None) -> Digits:
    """All 10,000 MNIST test digits from ``../shared`` (or ``root``), falling back to the shipped sample."""
    try:
        images, labels = load_mnist("test", root)
    except FileNotFoundError:
        if root is not None:
            raise
        return load_sample_digits()
    return Digits(images, labels, np.arange(len(images)))


def load_imagenet_sample(root: str | Path | None = None) -> list[tuple[Path, int]]:
    """(photo path, ImageNet class index) pairs from ``imagenet-sample/labels.csv``, in file order."""
    folder = Path(root) if root is not None else SHARED_DATA / "imagenet-sample"
    labels_csv = folder / "labels.csv"
    if not labels_csv.exists():
        raise FileNotFoundError(f"ImageNet sample not found: {labels_csv}")
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(folder / "images" / row["filename"], int(row["class_index"])) for row in rows]


ADVERSARIAL_DIGITS = ASSETS / "mnist_adversarial.npz"


@dataclass(frozen=True)
class AdversarialDigits:
    """Successful adversarial digits (uint8, as a camera would send them) with their source test index,
    true label and the attack that made them."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    attacks: np.ndarray

    def head(self, n: int) -> AdversarialDigits:
        """The first ``n`` (the file interleaves the attacks, so any head mixes all of them)."""
        return AdversarialDigits(self.images[:n], self.labels[:n], self.indices[:n], self.attacks[:n])


def load_adversarial_digits() -> AdversarialDigits:
    """Adversarial digits shipped with the package (made by scripts/make_adversarial.py from odd-indexed
    test digits, attacks interleaved)."""
    with np.load(ADVERSARIAL_DIGITS) as npz:
        return AdversarialDigits(npz["images"], npz["labels"].astype(np.int64), npz["indices"].astype(np.int64),
                                 npz["attacks"].astype(str))
