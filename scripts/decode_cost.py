"""What the dearest image each decoder accepts costs, and what the files it refuses would have cost.

Writes reports/security/decode_cost.md: CPU seconds (process time, best of 3) of the stream's decoder
(``worker.wire.decode_request``) and the HTTP route's (``worker.serve_app.decode_body``) on the largest files
each bound still admits, beside the cost check alone on the refused files (``pipeline.decode_cost``) and, for
scale, a plain decode of a 12 MP phone photo by OpenCV. Usage: ``python scripts/decode_cost.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "security"))

from test_redteam_inputs import inflate_bomb_png, progressive_jpeg, repeated_last_scan  # noqa: E402

from pipeline import decode_cost  # noqa: E402
from pipeline.imagecost import MAX_JPEG_SCANS  # noqa: E402
from worker import wire  # noqa: E402
from worker.serve_app import decode_body  # noqa: E402


def cpu(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        try:
            fn()
        except ValueError:
            pass
        best = min(best, time.process_time() - start)
    return best


def stream(data: bytes, encoding: str):
    return lambda: wire.decode_request(msgpack.packb({"v": 1, "id": "x", "image": data, "encoding": encoding},
                                                     use_bin_type=True))


def main() -> None:
    cv2.setNumThreads(1)
    grey = progressive_jpeg(4096)
    side = 2360  # the largest grey progressive JPEG whose pixels and coefficients fit the stream's 16 MiB
    base = progressive_jpeg(side)
    dearest_stream_jpeg = repeated_last_scan(base, MAX_JPEG_SCANS - decode_cost(base).scans)
    assert decode_cost(dearest_stream_jpeg).scans == MAX_JPEG_SCANS
    photo = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (3024, 4032, 3), np.uint8))[1].tobytes()
    rows = [
        ("accepted", "stream", f"progressive grey JPEG 2360², {MAX_JPEG_SCANS} scans (16 MiB with coefficients)",
         len(dearest_stream_jpeg), cpu(stream(dearest_stream_jpeg, "jpeg"))),
        ("accepted", "stream", "RGB PNG 2250×2250 of noise (15 MB, near the 16 MiB payload cap)", None, None),
        ("accepted", "http", "12 MP JPEG of noise (decode_body alone: the route caps bodies at 8 MiB)", len(photo),
         cpu(lambda: decode_body(photo))),
        ("accepted", "http", "16-bit RGBA PNG 4096²", None, None),
        ("refused", "both", "4096² JPEG, last scan ×1,000", None, None),
        ("refused", "both", "64×64 PNG inflating to 512 MiB", None, None),
        ("baseline", "-", "cv2.imdecode of the 12 MP photo", len(photo),
         cpu(lambda: cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR))),
    ]
    noise = np.random.default_rng(2).integers(0, 255, (2250, 2250, 3), np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    rows[1] = rows[1][:3] + (len(png), cpu(stream(png, "png")))
    deep = cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16))[1].tobytes()
    rows[3] = rows[3][:3] + (len(deep), cpu(lambda: decode_body(deep)))
    bomb = repeated_last_scan(grey, 1000)
    rows[4] = rows[4][:3] + (len(bomb), cpu(lambda: decode_cost(bomb)))
    inflate = inflate_bomb_png()
    rows[5] = rows[5][:3] + (len(inflate), cpu(lambda: decode_cost(inflate)))
    lines = ["# What one image costs to decode", "",
             "`python scripts/decode_cost.py`: CPU seconds (process time, best of 3, OpenCV on one thread) on this "
             "project's 2-core host. Accepted rows are the whole decoder (cost check and decode); refused rows are "
             "the cost check that refuses them, before any decoder runs.", "",
             "| | route | file | bytes | CPU s |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {r} | {what} | {n:,} | {t:.3f} |" for a, r, what, n, t in rows]
    out = ROOT / "reports" / "security" / "decode_cost.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
