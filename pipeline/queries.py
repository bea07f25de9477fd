"""Query probing: is an image a small edit of one its source sent just before?

An attacker without the weights learns from answers. Score-based attacks (Square) and decision-based ones
(HopSkipJump, Boundary) send thousands of images from one source, each a small edit of an earlier one: a few
blocks changed (Square's squares, a patch's position), or every pixel moved by less than a grey level (the binary
searches of a decision-based attack). A camera sends near-identical frames too, but never such edits: its sensor
noise redraws every pixel of every frame, so two frames differ in almost every block and by more than a grey level
(σ 1–3 levels of read and shot noise, more after JPEG), and a moved camera shifts every block.

So each image gets a :class:`Fingerprint`, small and of bounded size whatever the image's: one 16-bit hash per
non-flat block of pixels (exact content) and a count sketch of its pixels (a random projection whose distances
estimate the pixels' RMS difference). An image **probes** when, against some fingerprint of the same source and
shape, either most of its non-flat blocks are unchanged but not all (a sparse edit), or its RMS difference is
above zero and below :attr:`ProbeParams.noise_floor` grey levels (an edit under the sensor noise). An exact resend
(a retry, a frozen camera) is not a probe. What a source does with probes (k of its last n images, one alert per
episode) is the stream's window policy (worker.streams).

This is the stateful defence of Chen, Carlini and Wagner (2020) and Blacklight (Li et al. 2022), with the
similarity measured against a camera's noise rather than a benign user's: those flag any run of near-duplicates,
which is every camera. It does not stop an attacker who adds fresh noise above the floor to every query (a
blinding transform), who spaces queries with enough other images to push the base out of a source's history,
or who spreads queries over many sources; reports/query_monitor says what each costs the attacker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FORMAT = 1  # the fingerprint's byte layout, its first byte


@dataclass(frozen=True)
class ProbeParams:
    """``block``: side of the hashed blocks, in pixels of the image as received (larger on images of more than
    :data:`MAX_BLOCKS` such blocks); ``sketch``: the count sketch's
    dimensions (its RMS estimate's relative error is about ``sqrt(2 / sketch)``, 18% at 64); ``sparse``: the
    share of a probe's non-flat blocks left unchanged; ``noise_floor``: grey levels of RMS difference under which
    a changed image is an edit, not a new frame."""

    block: int = 4
    sketch: int = 64
    sparse: float = 0.5
    noise_floor: float = 1.0

    def __post_init__(self) -> None:
        if self.block < 1 or self.sketch < 1 or not 0 < self.sparse <= 1 or self.noise_floor <= 0:
            raise ValueError(f"probe parameters out of range: {self}")


MAX_BLOCKS = 1024  # blocks grow past ``ProbeParams.block`` on large images: a fingerprint stays about 2 KB
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(n: int, salt: int) -> np.ndarray:
    """A fixed pseudo-random uint64 per position 0..n-1 (multiplicative hashing): every process draws the same."""
    with np.errstate(over="ignore"):
        return (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * _GOLDEN


def _sketch_of(flat: np.ndarray, m: int) -> np.ndarray:
    """Count sketch of a flat float vector into ``m`` buckets: each position adds ±its value to one bucket, both
    fixed by its index, so that ||S a - S b||² estimates ||a - b||² (an unbiased estimate)."""
    h = _mix(len(flat), 1)
    bucket = (h >> np.uint64(40)) % np.uint64(m)
    sign = ((h >> np.uint64(20)) & np.uint64(1)).astype(np.float64) * 2 - 1
    return np.bincount(bucket.astype(np.int64), weights=flat * sign, minlength=m)


@dataclass(frozen=True)
class Fingerprint:
    """An image's shape, the 16-bit hash of each of its blocks (-1 for a flat block: one grey level throughout,
    which an empty background repeats in every image) and its count sketch (grey levels)."""

    shape: tuple[int, ...]
    blocks: np.ndarray  # int32 (B,), -1 flat
    sketch: np.ndarray  # float32 (m,)

    @classmethod
    def of(cls, image: np.ndarray, params: ProbeParams = ProbeParams()) -> Fingerprint:
        """The fingerprint of a uint8 image (H, W) or (H, W, C) as received, before any resize."""
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise ValueError(f"a fingerprint takes a uint8 (H, W) or (H, W, C) image, got {img.dtype} {img.shape}")
        hwc = img if img.ndim == 3 else img[:, :, None]
        h, w, c = hwc.shape
        b = max(params.block, math.ceil(math.sqrt(h * w / MAX_BLOCKS)))
        hb, wb = -(-h // b), -(-w // b)
        padded = np.pad(hwc, ((0, hb * b - h), (0, wb * b - w), (0, 0)), mode="edge")
        blocks = padded.reshape(hb, b, wb, b, c).transpose(0, 2, 1, 3, 4).reshape(hb * wb, b * b * c)
        flat = blocks.min(1) == blocks.max(1)
        # a 16-bit polynomial hash of each block's bytes (exact: one changed pixel changes it with odds 1 - 2^-16)
        weights = (_mix(b * b * c, 7) >> np.uint64(33)).astype(np.int64) | 1
        hashes = ((blocks.astype(np.int64) * weights).sum(1) >> 7) & 0xFFFF
        hashes[flat] = -1
        sketch = _sketch_of(hwc.reshape(-1).astype(np.float64), params.sketch)
        return cls(tuple(img.shape), hashes.astype(np.int32), sketch.astype(np.float32))

    def to_bytes(self) -> bytes:
        """Compact bytes for the source's history in Redis: format, rank, shape and sizes (uint32), a bitmap of
        the flat blocks, the block hashes (uint16), the sketch (float32)."""
        head = np.array([FORMAT, len(self.shape), *self.shape, len(self.blocks), len(self.sketch)], np.uint32)
        flat = np.packbits(self.blocks < 0)
        return b"".join([head.tobytes(), flat.tobytes(), np.where(self.blocks < 0, 0, self.blocks).astype(
            np.uint16).tobytes(), self.sketch.astype(np.float32).tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        """The fingerprint :meth:`to_bytes` wrote; ``ValueError`` for anything else."""
        try:
            fmt, rank = np.frombuffer(data[:8], np.uint32)
            if fmt != FORMAT or not 2 <= rank <= 3:
                raise ValueError
            head = np.frombuffer(data[: 4 * (rank + 4)], np.uint32)
            shape, nb, m = tuple(int(v) for v in head[2 : 2 + rank]), int(head[2 + rank]), int(head[3 + rank])
            at = 4 * (rank + 4)
            nflat = (nb + 7) // 8
            flat = np.unpackbits(np.frombuffer(data[at : at + nflat], np.uint8))[:nb].astype(bool)
            at += nflat
            blocks = np.frombuffer(data[at : at + 2 * nb], np.uint16).astype(np.int32)
            at += 2 * nb
            sketch = np.frombuffer(data[at : at + 4 * m], np.float32)
            if len(blocks) != nb or len(sketch) != m or at + 4 * m != len(data):
                raise ValueError
        except ValueError:
            raise ValueError("not a query fingerprint") from None
        return cls(shape, np.where(flat, -1, blocks), sketch.copy())


@dataclass(frozen=True)
class Comparison:
    """How an image relates to one earlier image of its source: ``unchanged``, the share of its non-flat blocks
    equal there (nan when it has none); ``rms``, the estimated RMS difference in grey levels."""

    unchanged: float
    rms: float


def compare(new: Fingerprint, old: Fingerprint) -> Comparison | None:
    """``new`` against ``old``; None when their shapes or layouts differ (different images, never an edit)."""
    found = ProbeHistory(1, prints=[old]).comparisons(new)
    return None if found is None else Comparison(float(found[0][0]), float(found[1][0]))


class ProbeHistory:
    """A source's recent fingerprints, newest first, at most ``size``: :meth:`probes` compares a new image with
    all of them at once (one array operation, not one per image)."""

    def __init__(self, size: int, params: ProbeParams = ProbeParams(), prints: list[Fingerprint] = ()) -> None:
        self.size, self.params = size, params
        self.prints: list[Fingerprint] = list(prints)[:size]

    @staticmethod
    def _layout(fp: Fingerprint) -> tuple:
        return fp.shape, fp.blocks.shape, fp.sketch.shape

    def comparisons(self, new: Fingerprint) -> tuple[np.ndarray, np.ndarray] | None:
        """Against every kept image of ``new``'s layout (shape, blocks, sketch): the share of ``new``'s non-flat
        blocks unchanged (nan when it has none) and the estimated RMS difference in grey levels; None when none
        has its layout."""
        layout = self._layout(new)
        same = [p for p in self.prints if self._layout(p) == layout]
        if not same:
            return None
        blocks = np.stack([p.blocks for p in same])
        sketches = np.stack([p.sketch for p in same]).astype(np.float64)
        live = new.blocks >= 0
        if live.any():
            unchanged = (blocks[:, live] == new.blocks[live]).mean(1)
        else:
            unchanged = np.full(len(blocks), np.nan)
        rms = np.sqrt(((sketches - new.sketch.astype(np.float64)) ** 2).sum(1) / int(np.prod(new.shape)))
        return unchanged, rms

    def probes(self, new: Fingerprint) -> bool:
        """Whether ``new`` is a small edit of one of these images: most of its non-flat blocks unchanged but not
        all, or an RMS difference above zero and under the noise floor (module docstring). An exact resend, or an
        image of another shape, is not."""
        found = self.comparisons(new)
        if found is None:
            return False
        unchanged, rms = found
        sparse = (unchanged >= self.params.sparse) & (unchanged < 1.0)
        return bool(((rms > 0) & (sparse | (rms < self.params.noise_floor))).any())

    def push(self, fp: Fingerprint) -> None:
        """``fp`` becomes the newest; the oldest beyond ``size`` is forgotten."""
        self.prints.insert(0, fp)
        del self.prints[self.size :]
