"""Red team: small image files built to cost the decoder seconds of CPU or hundreds of MiB, sent as a stream
request (``worker.wire.decode_request``, 16 MiB bound) and as an HTTP body (``worker.serve_app.decode_body``,
``pipeline.MAX_DECODE_BYTES``). Each is decoded in a child process whose peak RSS is read, OpenCV's native
allocations included (tracemalloc does not see them)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest

from pipeline import MAX_DECODE_BYTES, decode_cost
from pipeline.imagecost import MAX_JPEG_SCANS
from worker import wire

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024

_CHILD = r"""
import json, resource, sys, time
import cv2, msgpack, numpy as np
from worker import wire
from worker.serve_app import decode_body

def decode(data, encoding):
    if sys.argv[1] == "http":
        return decode_body(data)
    return wire.decode_request(msgpack.packb({"v": 1, "id": "x", "image": data, "encoding": encoding},
                                             use_bin_type=True)).image

for warm in (".png", ".jpg"):  # the first decode loads OpenCV's codecs: the measured one is the file alone
    decode(cv2.imencode(warm, np.zeros((8, 8), np.uint8))[1].tobytes(), warm.strip(".").replace("jpg", "jpeg"))
data = open(sys.argv[2], "rb").read()
before, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.process_time()
try:
    shape, error = list(decode(data, sys.argv[3]).shape), None
except ValueError as e:  # the stream's WireError, the core's InputError
    shape, error = None, f"{type(e).__name__}: {e}"
print(json.dumps({"error": error, "shape": shape, "cpu_s": time.process_time() - cpu,
                  "grown_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def decode_in_child(path: Path, route: str, encoding: str) -> dict:
    """Decode ``path`` as ``route`` ("stream" or "http") in a fresh process: its error, decoded shape, CPU
    seconds and peak-RSS growth of the measured decode."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _CHILD, route, str(path), encoding], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def progressive_jpeg(side: int = 4096, colour: bool = False) -> bytes:
    """A real progressive JPEG of a blocky noise picture (small on disk, large once decoded)."""
    small = np.random.default_rng(0).integers(0, 255, (side // 64, side // 64), np.uint8)
    img = cv2.resize(small, (side, side), interpolation=cv2.INTER_NEAREST)
    if colour:
        img = cv2.merge([img, img[::-1], img.T])
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes()


def repeated_last_scan(jpeg: bytes, repeats: int) -> bytes:
    """The JPEG with its last scan repeated: each copy is one more pass over the whole coefficient buffer."""
    last, end = jpeg.rfind(b"\xff\xda"), jpeg.rfind(b"\xff\xd9")
    return jpeg[:end] + jpeg[last:end] * repeats + b"\xff\xd9"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def inflate_bomb_png(side: int = 64, extra: int = 512 * MIB) -> bytes:
    """A valid 64×64 grey PNG whose zlib stream goes on with ``extra`` bytes of zeros past the image: libpng
    inflates all of it looking for the stream's end (about 1 KB of input per MB of work)."""
    deflate = zlib.compressobj(9)
    data = deflate.compress(b"\0" * (side * (side + 1)))
    block = b"\0" * MIB
    for _ in range(extra // MIB):
        data += deflate.compress(block)
    data += deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def test_a_jpeg_with_its_last_scan_repeated_is_refused_before_decoding(tmp_path):
    """99 KB, 4096², 1,000 copies of its last scan: 10 s of CPU per message before; refused from its markers."""
    bomb = repeated_last_scan(progressive_jpeg(), 1000)
    assert len(bomb) < 200_000
    path = tmp_path / "scans.jpg"
    path.write_bytes(bomb)
    for route in ("stream", "http"):
        got = decode_in_child(path, route, "jpeg")
        assert got["error"] and f"over {MAX_JPEG_SCANS} scans" in got["error"], got


def test_a_standard_progressive_jpeg_still_decodes_and_its_scans_are_counted():
    """What an encoder writes is not refused: a progressive colour photo has 10 scans."""
    data = progressive_jpeg(512, colour=True)
    cost = decode_cost(data)
    assert cost.problem is None and 6 <= cost.scans <= MAX_JPEG_SCANS
    assert cost.work_bytes == 512 * 512 * 2 * 3 // 2  # each component's coefficients (4:2:0), kept for the scans
    assert wire.decode_request(msgpack.packb({"v": 1, "id": "p", "image": data, "encoding": "jpeg"},
                                             use_bin_type=True)).image.shape == (512, 512, 3)


def test_a_progressive_grey_jpeg_at_the_side_limit_is_refused_on_the_stream(tmp_path):
    """4096² grey progressive: 16 MiB of pixels passed the stream's 16 MiB bound, but the decode also holds
    32 MiB of coefficients (+48 MiB measured). Refused now, from the header; the pixels alone would fit."""
    path = tmp_path / "grey.jpg"
    path.write_bytes(progressive_jpeg())
    got = decode_in_child(path, "stream", "jpeg")
    assert got["error"] and "pixels and coefficients" in got["error"] and got["grown_mib"] < 16, got


def test_a_16_bit_rgba_png_decodes_within_the_http_bound(tmp_path):
    """130 KB, 4096² 16-bit RGBA: +320 MiB over HTTP before (16-bit decode, a // 257 copy, alpha dropped by a
    copy). Now libpng strips it to 8-bit RGB as it decodes: 48 MiB of pixels, under the 128 MiB bound."""
    data = cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16))[1].tobytes()
    assert len(data) < 200_000
    path = tmp_path / "deep.png"
    path.write_bytes(data)
    got = decode_in_child(path, "http", "png")
    assert got["error"] is None and got["shape"] == [4096, 4096, 3], got
    assert got["grown_mib"] < MAX_DECODE_BYTES / MIB, got


def test_a_progressive_cmyk_jpeg_over_the_http_bound_is_refused_before_decoding(tmp_path):
    """4096² progressive CMYK: four components' coefficients (128 MiB) besides 48 MiB of RGB pixels, +176 MiB
    before. Refused from its header now, nothing decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("CMYK", (4096, 4096), (10, 20, 30, 40)).save(buffer, "JPEG", progressive=True, quality=50)
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(buffer.getvalue())
    cost = decode_cost(buffer.getvalue())
    assert cost.channels == 4 and cost.work_bytes == 4 * 4096 * 4096 * 2
    got = decode_in_child(path, "http", "jpeg")
    assert got["error"] and got["error"].startswith("ImageTooLargeError") and got["grown_mib"] < 16, got


@pytest.mark.parametrize("route", ["stream", "http"])
def test_a_png_whose_stream_inflates_past_its_image_is_refused(tmp_path, route):
    """A 64×64 PNG of 0.5 MB whose zlib stream inflates to 512 MiB: libpng inflates it all (about 1 s of CPU
    here; 16 MiB of it would be half a minute). Refused by a bounded inflate that stops at the image's size."""
    path = tmp_path / "inflate.png"
    path.write_bytes(inflate_bomb_png())
    got = decode_in_child(path, route, "png")
    assert got["error"] and "decompression bomb" in got["error"], got


def test_a_single_scan_of_one_component_is_charged_its_coefficient_buffer():
    """A baseline 4:4:4 JPEG whose one scan names fewer components than its frame: libjpeg buffers every
    coefficient for the scans to come (+47 MiB resident for 4096² measured), one scan or not."""
    from pipeline import decode_cost

    data = cv2.imencode(".jpg", np.zeros((512, 512, 3), np.uint8), [cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                                   cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])[1].tobytes()
    assert decode_cost(data).work_bytes == 0  # one interleaved scan: decoded a row of blocks at a time
    sos = data.index(b"\xff\xda")
    one = data[:sos] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + data[sos + 2 + int.from_bytes(
        data[sos + 2 : sos + 4], "big"):]
    cost = decode_cost(one)
    assert cost.scans == 1 and cost.work_bytes == 3 * 512 * 512 * 2


def test_markers_and_chunks_that_cost_the_walk_per_byte_are_bounded():
    """Runs of fill bytes are skipped as runs; bare markers (TEM, RSTn outside a scan) count toward the marker
    bound; a PNG of a million empty IDAT chunks is refused by its chunk count (4.5 s of walking before)."""
    from pipeline import decode_cost
    from pipeline.imagecost import MAX_JPEG_MARKERS, MAX_PNG_CHUNKS

    header = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes()
    filled = header[:2] + b"\xff" * (4 * MIB) + header[2:]
    assert decode_cost(filled).problem is None  # fill bytes are legal; the walk skips them in one search
    sos = header.index(b"\xff\xda")
    tems = header[:sos] + b"\xff\x01" * (MAX_JPEG_MARKERS + 1) + header[sos:]
    assert "markers" in decode_cost(tems).problem
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    iend = png.index(b"IEND") - 4
    empty = png_chunk(b"IDAT", b"")
    many = png[:iend] + empty * (MAX_PNG_CHUNKS + 1) + png[iend:]
    assert f"over {MAX_PNG_CHUNKS} chunks" in decode_cost(many).problem
