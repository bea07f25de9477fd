"""The msgpack wire schema: round trips, and a clear WireError for every kind of bad payload."""

from __future__ import annotations

import pickle

import cv2
import msgpack
import numpy as np
import pytest

from pipeline import decode_cost
from worker import wire
from worker.wire import WireError, decode_request, decode_verdict, encode_request, encode_verdict


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    from pipeline.samples import load_sample_digits

    return load_sample_digits().images[7]


def _req(**over) -> bytes:
    obj = {
        "v": 1,
        "id": "x",
        "image": bytes(28 * 28),
        "encoding": "raw",
        "shape": [28, 28],
        "dtype": "uint8",
        "model": "mnist",
        "heatmap": False,
        "meta": {},
    }
    obj.update(over)
    for k in [k for k, v in over.items() if v is _DROP]:
        del obj[k]
    return msgpack.packb(obj, use_bin_type=True)


_DROP = object()


def _raises(data: bytes, *words: str) -> WireError:
    with pytest.raises(WireError) as ei:
        decode_request(data)
    msg = ei.value.reason.lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in {msg!r}"
    return ei.value


# -- round trips --------------------------------------------------------------------------------------------


def test_raw_round_trip_is_exact_and_zero_copy(digit):
    data = encode_request("img-1", digit, meta={"enqueued_at": 12.5, "source": "cam-3"}, heatmap=True)
    req = decode_request(data)
    assert req.id == "img-1" and req.model == "mnist" and req.heatmap is True and req.encoding == "raw"
    assert req.image.dtype == np.uint8 and req.image.shape == (28, 28)
    np.testing.assert_array_equal(req.image, digit)
    assert req.enqueued_at == 12.5 and req.meta["source"] == "cam-3"
    assert not req.image.flags.owndata and not req.image.flags.writeable  # a view on the payload bytes


def test_png_round_trip_is_lossless(digit):
    req = decode_request(encode_request("p", digit, encoding="png"))
    np.testing.assert_array_equal(req.image, digit)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        decode_request(encode_request("c", rgb, encoding="png")).image, rgb
    )  # RGB kept
    rgba = np.random.default_rng(1).integers(0, 256, (9, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_request(encode_request("a", rgba, encoding="png")).image, rgba)
    g1 = digit[:, :, None]
    out = decode_request(encode_request("g", g1, encoding="png")).image
    assert out.shape == (28, 28, 1)
    np.testing.assert_array_equal(out, g1)


def test_jpeg_round_trip_is_close(digit):
    req = decode_request(encode_request("j", digit, encoding="jpeg"))
    assert req.image.shape == (28, 28) and req.image.dtype == np.uint8
    assert np.abs(req.image.astype(int) - digit).mean() < 3
    rgb = np.full((16, 16, 3), (200, 30, 10), dtype=np.uint8)  # channel order survives
    out = decode_request(encode_request("c", rgb, encoding="jpeg")).image
    assert np.abs(out.astype(int) - rgb).max() < 8


def test_a_producer_without_numpy_can_write_a_request():
    """What docs/wire.md tells other languages to send: a plain msgpack map; optional fields left out."""
    data = msgpack.packb(
        {"v": 1, "id": "ext-1", "image": bytes(range(256)) * 3 + bytes(16), "shape": [28, 28]}
    )
    req = decode_request(data)
    assert req.image.shape == (28, 28) and req.model == "mnist" and req.heatmap is False and req.meta == {}
    assert req.enqueued_at is None


def test_verdict_round_trip_converts_numpy():
    v = {
        "id": "a",
        "stream_id": "1-0",
        "is_adversarial": np.bool_(True),
        "score": np.float64(0.25),
        "predicted_class": np.int64(3),
        "heatmap": wire.heatmap_field(np.ones((4, 5), np.float32) / 3),
    }
    out = decode_verdict(encode_verdict(v))
    assert (
        out["v"] == 1
        and out["is_adversarial"] is True
        and out["score"] == 0.25
        and out["predicted_class"] == 3
    )
    hm = wire.heatmap_array(out)
    assert hm.shape == (4, 5) and np.allclose(hm, 1 / 3, atol=1e-3)
    long = decode_verdict(encode_verdict({"id": "b", "error": "x" * 10_000}))
    assert len(long["error"]) == wire.MAX_ERROR_CHARS
    with pytest.raises(WireError, match="version"):
        decode_verdict(msgpack.packb({"v": 2, "id": "a"}))


def test_dead_letter_truncates_payload():
    d = wire.decode_dead_letter(wire.encode_dead_letter("5-0", b"z" * 100_000, "bad"))
    assert d["reason"] == "bad" and d["truncated"] and d["payload_len"] == 100_000
    assert len(d["payload"]) == wire.MAX_DEAD_PAYLOAD_BYTES


# -- bad payloads -------------------------------------------------------------------------------------------


def test_random_bytes_and_non_maps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        blob = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        with pytest.raises(WireError):
            decode_request(blob)
    _raises(b"", "empty")
    _raises(msgpack.packb([1, 2, 3]), "map")
    _raises(msgpack.packb("hello"), "map")
    _raises(_req() + b"\x00", "trailing")
    _raises(_req()[:-10], "msgpack")
    _raises(pickle.dumps({"v": 1, "id": "x"}), "msgpack")  # never unpickled
    with pytest.raises(WireError, match="bytes"):
        decode_request("a string")  # type: ignore[arg-type]


def test_schema_version():
    _raises(_req(v=2), "unsupported schema version v=2")
    _raises(_req(v=0), "version")
    _raises(_req(v="1"), "'v' must be an integer")
    _raises(_req(v=_DROP), "missing field 'v'")


def test_missing_and_mistyped_fields():
    _raises(_req(id=_DROP), "missing field 'id'")
    _raises(_req(image=_DROP), "missing field 'image'")
    _raises(_req(shape=_DROP), "missing field 'shape'", "raw")
    _raises(_req(id=""), "'id' is empty")
    _raises(_req(id=42), "'id' must be a string")
    _raises(_req(id="x" * 300), "'id' has 300 characters")
    _raises(_req(image="not bytes"), "'image' must be binary")
    _raises(_req(heatmap="yes"), "'heatmap' must be a boolean")
    _raises(_req(meta=[1]), "'meta' must be a map")
    _raises(_req(meta={"k": "x" * 10_000}), "'meta' packs to")
    _raises(_req(meta={str(i): i for i in range(100)}), "'meta' has 100 keys")
    _raises(_req(model=""), "'model'")
    _raises(_req(encoding="webp"), "unknown encoding 'webp'")


def test_wrong_dtype_is_rejected():
    _raises(_req(dtype="float32", image=bytes(28 * 28 * 4)), "dtype 'float32' not supported", "uint8")
    with pytest.raises(WireError, match="uint8"):
        encode_request("f", np.full((28, 28), np.nan, dtype=np.float32))
    with pytest.raises(WireError, match="uint8"):
        encode_request("i", np.zeros((28, 28), dtype=np.int64))


def test_shape_problems():
    _raises(_req(shape=[28, 27]), "needs 756 bytes", "has 784")  # shape/bytes mismatch
    _raises(_req(shape=[100_000, 100_000]), "too large")  # huge declared shape: rejected before allocating
    _raises(_req(shape=[4096, 4096, 3]), "too large")
    _raises(_req(shape=[0, 28], image=b""), "zero-size")
    _raises(_req(image=b""), "zero-size")
    _raises(_req(shape=[28, 28, 2], image=bytes(28 * 28 * 2)), "wrong channel count 2")
    _raises(_req(shape=[28, 28, 5], image=bytes(28 * 28 * 5)), "wrong channel count 5")
    _raises(_req(shape=[28]), "[h, w] or [h, w, c]")
    _raises(_req(shape=[1, 2, 3, 4]), "[h, w] or [h, w, c]")
    _raises(_req(shape=[28.0, 28.0]), "integers")
    with pytest.raises(WireError, match="zero-size"):
        encode_request("z", np.zeros((0, 28), np.uint8))
    with pytest.raises(WireError, match="channel"):
        encode_request("c", np.zeros((28, 28, 2), np.uint8))


def test_oversize_payload():
    big = b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1)
    _raises(big, "exceeds")
    with pytest.raises(WireError, match="exceeds|too large"):
        encode_request("big", np.zeros((4096, 4096, 3), np.uint8))


def test_truncated_and_corrupt_png(digit):
    png = cv2.imencode(".png", digit)[1].tobytes()
    _raises(_req(encoding="png", image=png[: len(png) // 2]), "truncated png")
    _raises(_req(encoding="png", image=png[:20]), "png")
    body = bytearray(png)
    body[40:60] = b"\x00" * 20  # header and IEND intact, compressed data garbage
    _raises(_req(encoding="png", image=bytes(body)), "corrupt png")
    _raises(_req(encoding="png", image=b"GIF89a" + bytes(100)), "not a png")
    _raises(_req(encoding="png", image=png, shape=[28, 30]), "declared shape [28, 30]")
    _raises(_req(encoding="png", image=png, shape=[28, 28, 3]), "declared 3 channel")


def test_truncated_and_corrupt_jpeg(digit):
    jpg = cv2.imencode(".jpg", digit)[1].tobytes()
    _raises(_req(encoding="jpeg", image=jpg[: len(jpg) - 40]), "truncated jpeg")
    _raises(_req(encoding="jpeg", image=jpg[:10]), "jpeg")
    _raises(_req(encoding="jpeg", image=b"\x89PNG" + bytes(50)), "not a jpeg")
    with pytest.raises(WireError, match="4 channels"):
        encode_request("a", np.zeros((8, 8, 4), np.uint8), encoding="jpeg")


def test_png_decompression_bomb_is_refused_from_its_header():
    # a real PNG header that declares 50000×50000 pixels: refused before cv2 would try to allocate 2.5 GB
    ihdr = b"IHDR" + (50_000).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00"
    png = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + b"\x00" * 4 + b"IEND\xaeB`\x82"
    _raises(_req(encoding="png", image=png, shape=_DROP), "too large")


def _with_trns(png: bytes, data: bytes) -> bytes:
    """The PNG with a tRNS (transparency) chunk inserted after its IHDR."""
    import struct
    import zlib

    chunk = struct.pack(">I", len(data)) + b"tRNS" + data + struct.pack(">I", zlib.crc32(b"tRNS" + data))
    return png[:33] + chunk + png[33:]


def test_the_header_says_what_opencv_will_decode():
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 200, (20, 30), dtype=np.uint8), rng.integers(0, 200, (20, 30, 3), dtype=np.uint8)
    cases = [cv2.imencode(".png", grey)[1].tobytes(), cv2.imencode(".png", rgb)[1].tobytes(),
             cv2.imencode(".png", rng.integers(0, 200, (20, 30, 4), dtype=np.uint8))[1].tobytes(),
             cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(),
             _with_trns(cv2.imencode(".png", grey)[1].tobytes(), b"\x00\x05"),
             _with_trns(cv2.imencode(".png", rgb)[1].tobytes(), b"\x00\x05" * 3),
             cv2.imencode(".jpg", grey)[1].tobytes(), cv2.imencode(".jpg", rgb)[1].tobytes()]
    for data in cases:
        header = decode_cost(data)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert (header.height, header.width) == decoded.shape[:2]
        assert header.max_decoded_bytes == decoded.nbytes
    assert decode_cost(b"II*\x00" + b"\x00" * 40) is None  # a TIFF


def test_what_would_decode_too_large_or_16_bit_is_refused_from_the_header():
    """Found in review: a 4096×4096 16-bit RGBA PNG of 130 KB decoded to 128 MiB before it was refused."""
    big16 = cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16))[1].tobytes()
    _raises(_req(encoding="png", image=big16, shape=_DROP), "16-bit samples")
    big_rgb = cv2.imencode(".png", np.zeros((2400, 2400, 3), np.uint8))[1].tobytes()  # 17.3 MB once decoded
    _raises(_req(encoding="png", image=big_rgb, shape=_DROP), "needs 17280000 bytes to decode")
    # 4096×4096 greyscale is exactly the limit, and stays accepted
    ok = cv2.imencode(".png", np.zeros((4096, 4096), np.uint8))[1].tobytes()
    assert decode_request(_req(encoding="png", image=ok, shape=_DROP)).image.shape == (4096, 4096)


def test_a_payload_of_many_tiny_containers_is_refused_before_it_is_built(digit):
    """msgpack packs an empty array in one byte: 1 MB of nested empty arrays, each within the per-array limit,
    would build a million lists (found in review: 15.8 MB built 16 million, 1 GiB in 5.8 s)."""
    obj = msgpack.unpackb(encode_request("bomb", digit), raw=False)
    obj["junk"] = [[[] for _ in range(1024)] for _ in range(1024)]
    _raises(msgpack.packb(obj, use_bin_type=True), f"more than {wire.MAX_CONTAINERS} arrays and maps")
    # a meta map at its limits (4 KiB) of small arrays is under the bound
    obj["junk"], obj["meta"] = [], {"a": [[1, 2]] * 1000, "b": [[1, 2]] * 300}
    assert len(msgpack.packb(obj["meta"])) <= wire.MAX_META_BYTES
    assert decode_request(msgpack.packb(obj, use_bin_type=True)).id == "bomb"
