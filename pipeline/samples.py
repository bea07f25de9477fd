"""The real digits shipped inside the package: a sample of clean MNIST test digits and adversarial ones.

They make the demo, the examples and the tests run offline on a fresh clone; ``scripts/make_sample.py`` and
``scripts/make_adversarial.py`` made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_DIGITS = ASSETS / "mnist_sample.npz"
ADVERSARIAL_DIGITS = ASSETS / "mnist_adversarial.npz"

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
