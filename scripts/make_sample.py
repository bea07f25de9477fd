"""Write pipeline/assets/mnist_sample.npz: the real MNIST test digits 0..1999 (1,000 even, 1,000 odd indices).

Run: python scripts/make_sample.py   (reads ../shared/data/mnist)
"""

import numpy as np

from evaluation.datasets import load_mnist
from pipeline.samples import SAMPLE_DIGITS


def main() -> None:
    images, labels = load_mnist("test")
    idx = np.arange(2000)
    np.savez_compressed(
        SAMPLE_DIGITS, images=images[idx], labels=labels[idx].astype(np.uint8), indices=idx.astype(np.int16)
    )
    print(f"wrote {SAMPLE_DIGITS} ({SAMPLE_DIGITS.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
