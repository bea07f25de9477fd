"""What decoding a PNG or JPEG will cost, read from its bytes before any decoder runs.

A small file can buy a decoder a great deal of work or memory: a PNG chunk may declare gigabytes, its
compressed stream may inflate far past the image it holds (libpng inflates the excess to find its end: 1 MB of
deflate cost 2 s of CPU), a 16-bit RGBA PNG decodes to twice the bytes of an 8-bit one, a progressive JPEG needs
a coefficient buffer of twice its pixels' bytes per component besides the pixels, and every scan of it is a pass
over that buffer (a 99 KB JPEG whose last scan is repeated 1,000 times cost 10 s). :func:`decode_cost` reads the
header and walks the markers or chunks, :func:`cost_problem` says what is over a budget, and every decoder of
this package (``pipeline.decode_image``, the stream's wire format) asks it first.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_ANCILLARY_CHUNKS = 64  # chunks other than IHDR/PLTE/IDAT/IEND: each bad one is a libpng warning in the log
# chunks of any kind: encoders write image data in chunks of 8 KiB or more (a 16 MiB PNG in about 2,000), and each
# chunk costs the walk and libpng a few microseconds whatever its size
MAX_PNG_CHUNKS = 16384
# every scan of a JPEG is a pass over its coefficients (measured here: 12 ms per scan of a 4096² grey image); a
# standard progressive script has 6 (grey) or 10 (colour) scans, encoders that optimise scans use up to ~20
MAX_JPEG_SCANS = 32
MAX_JPEG_MARKERS = 1024  # segments of any kind (tables, APPn, scans): a photo has a few dozen
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # a marker inside entropy-coded data (not RSTn, not FF 00)
_NOT_FILL = re.compile(rb"[^\xff]")
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)
# PNG colour type -> samples per pixel (grey, RGB, palette index, grey + alpha, RGBA)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# PNG colour type -> the channels OpenCV's IMREAD_UNCHANGED decodes it to (a palette expands to RGB); a tRNS chunk
# (transparency) adds an alpha channel to RGB and palette images
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}


@dataclass(frozen=True)
class ImageCost:
    """A PNG's or JPEG's header and what decoding it costs. ``channels`` and ``bits`` (per sample) as declared;
    ``max_channels``: what OpenCV's IMREAD_UNCHANGED decodes it to; ``scans``: a JPEG's scans (1 for a PNG);
    ``work_bytes``: the decoder's own buffers besides the output (a JPEG's whole-image coefficients when it has
    several scans); ``problem``: what in the file's structure is over a bound or broken, else None."""

    format: str
    height: int
    width: int
    channels: int
    bits: int
    max_channels: int
    scans: int = 1
    work_bytes: int = 0
    problem: str | None = None

    @property
    def max_decoded_bytes(self) -> int:
        """The most bytes OpenCV's IMREAD_UNCHANGED decode of this image allocates for its pixels."""
        return self.height * self.width * self.max_channels * (2 if self.bits > 8 else 1)

    def decode_bytes(self, out_channels: int | None = None) -> int:
        """What the decode allocates, pixels and decoder buffers together: into ``out_channels`` 8-bit channels
        (IMREAD_COLOR or IMREAD_GRAYSCALE), or as IMREAD_UNCHANGED decodes it when None."""
        pixels = self.max_decoded_bytes if out_channels is None else self.height * self.width * out_channels
        return pixels + self.work_bytes


def png_chunk_problem(data: bytes | bytearray | memoryview) -> str | None:
    """What is wrong with a PNG's chunk table, or None: walked before anything decodes the file. Every chunk's
    declared length must fit in the bytes that follow it (libpng allocates a chunk's declared length before
    reading it, so a 100-byte file claiming a 2 GiB text chunk would cost 2 GiB), the image must end with IEND
    (bytes after it are allowed), at most ``MAX_PNG_ANCILLARY_CHUNKS`` ancillary chunks and ``MAX_PNG_CHUNKS``
    chunks in all may come."""
    return _png_chunks(memoryview(data))[1]


def _png_chunks(mv: memoryview) -> tuple[list[tuple[bytes, memoryview]], str | None]:
    """(kind, body) of each chunk before IEND, and what is wrong with the table (then the list is partial)."""
    i, n, ancillary, chunks = 8, len(mv), 0, []
    while True:
        if i + 12 > n:
            return chunks, "truncated PNG (no IEND chunk)"
        length = int.from_bytes(mv[i : i + 4], "big")
        kind = bytes(mv[i + 4 : i + 8])
        if length > n - i - 12:
            return chunks, f"PNG chunk {kind!r} declares {length} bytes but the file holds {n - i - 12} more: " \
                           "corrupt or a decoder bomb"
        if kind == b"IEND":
            return chunks, None
        if len(chunks) == MAX_PNG_CHUNKS:
            return chunks, f"PNG has over {MAX_PNG_CHUNKS} chunks"
        if kind not in (b"IHDR", b"PLTE", b"IDAT"):
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                return chunks, f"PNG has over {MAX_PNG_ANCILLARY_CHUNKS} ancillary chunks"
        chunks.append((kind, mv[i + 8 : i + 8 + length]))
        i += 12 + length


def _png_rows_bytes(width: int, height: int, samples: int, bits: int, interlaced: bool) -> int:
    """The bytes of a PNG's filtered scanlines, the exact length its zlib stream must inflate to."""
    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * samples * bits + 7) // 8)

    if not interlaced:
        return rows(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in passes)


def _inflated_size(idat: list[memoryview], limit: int) -> int:
    """How many bytes the IDAT stream inflates to, stopping once it is past ``limit``: the decode's own pass,
    bounded, and without keeping what it inflates (a block of output at a time)."""
    inflater, total = zlib.decompressobj(), 0
    for part in idat:
        data = bytes(part)
        while data and not inflater.eof:
            total += len(inflater.decompress(data, 1 << 20))
            data = inflater.unconsumed_tail
            if total > limit:
                return total
    return total


def _png(mv: memoryview) -> ImageCost | None:
    if len(mv) < 33 or bytes(mv[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack(">II", mv[16:24])
    bits, colour, interlace = mv[24], mv[25], mv[28]
    if colour not in _PNG_CHANNELS:
        return None
    chunks, problem = _png_chunks(mv)
    transparent = any(kind == b"tRNS" for kind, _ in chunks)
    alpha = colour in (2, 3) and transparent  # OpenCV ignores a grey image's tRNS (measured)
    if problem is None:
        expected = _png_rows_bytes(width, height, _PNG_SAMPLES[colour], bits, interlace == 1)
        inflated = _inflated_size([body for kind, body in chunks if kind == b"IDAT"], expected)
        if inflated > expected:
            problem = (f"PNG image data inflates past the {expected} bytes a {width}×{height} image holds: a "
                       "decompression bomb")
    return ImageCost("png", height, width, _PNG_CHANNELS[colour], bits, 4 if alpha else _PNG_CHANNELS[colour],
                     problem=problem)


def _jpeg(mv: memoryview) -> ImageCost | None:
    data = mv.obj if isinstance(mv.obj, bytes) and len(mv.obj) == len(mv) else bytes(mv)
    i, n, scans, markers, partial = 2, len(data), 0, 0, False
    frame: tuple[int, int, int, int, list[tuple[int, int]], bool] | None = None
    problem = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None if frame is None else _jpeg_cost(frame, scans, "JPEG data out of sync with its markers")
        marker = data[i + 1]
        if marker == 0xFF:  # fill bytes: skipped as a run, not a byte at a time
            found = _NOT_FILL.search(data, i + 1)
            i = (found.start() - 1) if found else n
            continue
        if marker == 0xD9:  # EOI
            break
        markers += 1  # every marker counts, those without a length too (TEM, RSTn outside a scan)
        if markers > MAX_JPEG_MARKERS:
            problem = f"JPEG has over {MAX_JPEG_MARKERS} markers"
            break
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if seg_len < 2 or i + 2 + seg_len > n:
            problem = "truncated JPEG segment"
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and frame is None:  # SOFn
            if seg_len < 8:
                return None
            bits = data[i + 4]
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            count = data[i + 9]
            sampling = [(data[i + 11 + 3 * k] >> 4, data[i + 11 + 3 * k] & 15) for k in range(count)
                        if i + 12 + 3 * k <= i + 2 + seg_len]
            frame = (h, w, count, bits, sampling, marker in _PROGRESSIVE_SOF)
        if marker == 0xDA and frame is not None and data[i + 4] < frame[2]:
            partial = True  # a scan of fewer components than the frame: libjpeg buffers every coefficient
        i += 2 + seg_len
        if marker == 0xDA:  # SOS: the scan's entropy-coded data runs to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                problem = f"JPEG has over {MAX_JPEG_SCANS} scans (each one a pass over the whole image)"
                break
            found = _JPEG_MARKER.search(data, i)
            i = found.start() if found else n
    if frame is None:
        return None
    return _jpeg_cost(frame, scans, problem, partial)


def _jpeg_cost(frame, scans: int, problem: str | None, partial: bool = False) -> ImageCost:
    h, w, count, bits, sampling, progressive = frame
    work = 0
    if (progressive or scans > 1 or partial) and sampling:  # libjpeg keeps every component's coefficients
        hmax, vmax = max(s[0] for s in sampling) or 1, max(s[1] for s in sampling) or 1
        for hs, vs in sampling:
            cw, ch = -(-w * hs // hmax), -(-h * vs // vmax)
            work += -(-cw // 8) * -(-ch // 8) * 64 * 2
    return ImageCost("jpeg", h, w, count, bits, 1 if count == 1 else 3, scans, work, problem)


def decode_cost(data: bytes | bytearray | memoryview) -> ImageCost | None:
    """The :class:`ImageCost` of a PNG (IHDR, chunk table, inflated size) or JPEG (SOF, every marker and scan),
    found by its signature; None for any other format or a header that cannot be read."""
    mv = memoryview(data)
    if bytes(mv[:8]) == PNG_SIGNATURE:
        return _png(mv)
    if len(mv) >= 4 and mv[0] == 0xFF and mv[1] == 0xD8:
        return _jpeg(mv)
    return None


def cost_problem(cost: ImageCost, max_bytes: int, out_channels: int | None = None) -> str | None:
    """Why decoding an image of ``cost`` is refused under a budget of ``max_bytes`` (pixels and decoder buffers,
    decoded into ``out_channels`` 8-bit channels or, when None, as IMREAD_UNCHANGED does), or None."""
    if cost.problem:
        return cost.problem
    need = cost.decode_bytes(out_channels)
    if need > max_bytes:
        what = "pixels and coefficients" if cost.work_bytes else "pixels"
        return (f"{cost.format.upper()} image {cost.height}×{cost.width} needs {need} bytes to decode ({what}), "
                f"limit {max_bytes}")
    return None
