"""The wire format between producers, the worker and verdict consumers: versioned msgpack, never pickle.

Every Redis stream entry (images, verdicts, dead letters) has exactly one field, ``data``, holding the msgpack
bytes of one map; pub/sub messages carry the same bytes. ``docs/wire.md`` is the producer-facing spec.

Decoding is defensive: every size is bounded *before* allocation (msgpack's ``max_*_len`` limits, declared
shapes, PNG/JPEG header dimensions read before decompressing) and every violation raises :class:`WireError`
with a reason a producer can act on. Raw images decode without a copy (``numpy.frombuffer``; the array is
read-only).
"""

from __future__ import annotations

import binascii
import functools
import math
import string
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import numpy as np

from pipeline import cost_problem, decode_cost

VERSION = 1

# -- limits -----------------------------------------------------------------------------------------------
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024  # one whole request / verdict / dead letter
MAX_ID_CHARS = 256
MAX_MODEL_CHARS = 64
MAX_SOURCE_CHARS = 128  # a camera or feed id: alert windows keep per-source state under it
MAX_DIM = 4096  # every image side
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # H*W*C of the decoded image (raw bytes, or decompressed PNG/JPEG)
CHANNELS = (1, 3, 4)
MAX_META_BYTES = 4096  # the meta map, re-packed
MAX_META_KEYS = 32
# arrays and maps in one payload, nested ones included: each packs to at least one byte and only meta may hold
# many, so no valid request comes near it
MAX_CONTAINERS = MAX_META_BYTES + 16
MAX_STR_CHARS = 64 * 1024  # any string in a request/verdict (meta strings are bounded by MAX_META_BYTES)
MAX_ERROR_CHARS = 2000  # verdict "error" messages are truncated to this
EPISODE_KINDS = ("episode", "probing")  # alerts about a source's window: flagged images, or a query attack
MAX_REF_CHARS = 2048  # a reference's URL
MAX_REF_BYTES = MAX_PAYLOAD_BYTES  # the object a reference names: no bigger than an inline request may be
MAX_DEAD_PAYLOAD_BYTES = 64 * 1024  # dead letters keep at most this much of the offending entry

ENCODINGS = ("raw", "png", "jpeg")
_UNPACK_LIMITS = dict(
    max_bin_len=MAX_PAYLOAD_BYTES,
    max_str_len=MAX_STR_CHARS,
    max_array_len=1024,
    max_map_len=256,
    max_ext_len=0,
)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class WireError(ValueError):
    """A payload that does not follow the wire schema; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageTooLarge(WireError):
    """An image over a size limit (the HTTP route answers 413 for it, 415 for other undecodable bodies)."""


CLUSTER_SLOTS = 16384  # Redis Cluster's hash slots


def key_slot(tag: str) -> int:
    """The Redis Cluster slot of a key whose hash tag is ``tag``: CRC16 (XMODEM) of its UTF-8 bytes mod 16384."""
    return binascii.crc_hqx(tag.encode("utf-8"), 0) % CLUSTER_SLOTS


@functools.lru_cache(maxsize=4096)
def shard_tag(index: int, shards: int) -> str:
    """The hash tag of shard ``index`` of ``shards`` (the text between ``{`` and ``}`` in its key names):
    ``"<index>"``, else ``"<index>-<j>"`` for the smallest j ≥ 1, the first whose slot (:func:`key_slot`) lies in
    the middle half of the shard's own 1/``shards`` of the slots. So the shards' keys spread over the slot space
    in order: on a cluster whose masters own equal slot ranges (as ``redis-cli --cluster create`` makes them), a
    shard count that is a multiple of the masters puts the same number of shards on each."""
    if not 0 <= index < shards:
        raise ValueError(f"shard index {index} out of range for {shards} shards")
    width = CLUSTER_SLOTS / shards
    lo, hi = index * width + width / 4, (index + 1) * width - width / 4
    tag, j = str(index), 0
    while not lo <= key_slot(tag) < hi:
        j += 1
        tag = f"{index}-{j}"
    return tag


def shard_of(key: str, shards: int) -> int:
    """The image stream (shard) a request goes to: ``crc32(key) mod shards``, ``key`` being the request's
    ``source`` (so one camera's images stay in order on one shard), else its ``id``; CRC-32 as zlib, Java's
    ``java.util.zip.CRC32`` and Go's ``hash/crc32.ChecksumIEEE`` compute it, over the key's UTF-8 bytes."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return zlib.crc32(key.encode("utf-8")) % shards


@dataclass(frozen=True)
class Ref:
    """An image by reference: the URL to fetch its file from, its size in bytes and its SHA-256 (hex)."""

    url: str
    size: int
    sha256: str


@dataclass
class Request:
    """One decoded image request. ``image`` is uint8 H×W or H×W×C (read-only for raw payloads); None while a
    request by reference (``ref``) is not fetched yet (:func:`with_fetched`)."""

    id: str
    image: np.ndarray | None
    model: str = "mnist"
    heatmap: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    encoding: str = "raw"
    enqueued_at: float | None = None  # meta["enqueued_at"] (unix seconds) when the producer set it
    source: str | None = None  # the camera or feed it came from: alert windows count per source
    ref: Ref | None = None  # where the image's file is, when it came by reference
    declared_shape: tuple[int, ...] | None = None  # the request's ``shape``, checked against a fetched file

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)


# -- helpers ----------------------------------------------------------------------------------------------


def _unpack(data: object, what: str) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise WireError(f"{what}: empty payload")
    if n > MAX_PAYLOAD_BYTES:
        raise WireError(f"{what}: payload of {n} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    containers = 0

    def counted(container: Any) -> Any:
        # msgpack packs an empty array in one byte: without a bound on how many there are, a payload within every
        # per-array limit could build millions of lists and gigabytes of memory
        nonlocal containers
        containers += 1
        if containers > MAX_CONTAINERS:
            raise WireError(f"{what}: more than {MAX_CONTAINERS} arrays and maps in one payload")
        return container

    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, list_hook=counted,
                              object_hook=counted, **_UNPACK_LIMITS)
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError(
            f"{what}: trailing bytes after the msgpack map (corrupt or concatenated payload)"
        ) from None
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as e:
        raise WireError(f"{what}: not valid msgpack within the limits ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what}: top level must be a msgpack map, got {type(obj).__name__}")
    return obj


def _check_version(obj: dict, what: str) -> None:
    if "v" not in obj:
        raise WireError(f"{what}: missing field 'v' (schema version; this worker reads v={VERSION})")
    v = obj["v"]
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError(f"{what}: field 'v' must be an integer, got {type(v).__name__}")
    if v != VERSION:
        raise WireError(f"{what}: unsupported schema version v={v} (this worker reads v={VERSION})")


def _get(obj: dict, key: str, types: type | tuple[type, ...], what: str, default: Any = ..., tname: str = ""):
    if key not in obj or (obj[key] is None and default is not ...):
        if default is ...:
            raise WireError(f"{what}: missing field '{key}'")
        return default
    val = obj[key]
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in _as_tuple(types)):
        raise WireError(f"{what}: field '{key}' must be {tname or _tn(types)}, got {type(val).__name__}")
    return val


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _tn(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _check_id(rid: str, what: str) -> None:
    if not rid:
        raise WireError(f"{what}: field 'id' is empty")
    if len(rid) > MAX_ID_CHARS:
        raise WireError(f"{what}: field 'id' has {len(rid)} characters, limit {MAX_ID_CHARS}")


def _check_source(source: str, what: str) -> None:
    if not source or len(source) > MAX_SOURCE_CHARS or not source.isprintable():
        raise WireError(f"{what}: field 'source' must have 1 to {MAX_SOURCE_CHARS} printable characters")


def _check_shape(shape: object, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3):
        raise WireError(f"{what}: field 'shape' must be [H, W] or [H, W, C], got {shape!r:.80}")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise WireError(f"{what}: field 'shape' must hold integers, got {shape!r:.80}")
    if any(d <= 0 for d in shape):
        raise WireError(f"{what}: zero-size or negative image shape {list(shape)}")
    h, w = shape[0], shape[1]
    if h > MAX_DIM or w > MAX_DIM:
        raise WireError(f"{what}: image {h}×{w} too large: each side must be ≤ {MAX_DIM}")
    if len(shape) == 3 and shape[2] not in CHANNELS:
        raise WireError(f"{what}: wrong channel count {shape[2]}: must be one of {list(CHANNELS)}")
    if math.prod(shape) > MAX_IMAGE_BYTES:
        raise WireError(f"{what}: image of {math.prod(shape)} bytes too large (limit {MAX_IMAGE_BYTES})")
    return tuple(shape)


def _check_meta(meta: dict, what: str) -> None:
    if len(meta) > MAX_META_KEYS:
        raise WireError(f"{what}: 'meta' has {len(meta)} keys, limit {MAX_META_KEYS}")
    if not all(isinstance(k, str) for k in meta):
        raise WireError(f"{what}: 'meta' keys must be strings")
    size = len(msgpack.packb(meta, use_bin_type=True))
    if size > MAX_META_BYTES:
        raise WireError(f"{what}: 'meta' packs to {size} bytes, limit {MAX_META_BYTES}")


# -- compressed images: what a PNG or JPEG costs to decode, read before OpenCV runs (pipeline.imagecost) ------


def _decode_compressed(buf: bytes, encoding: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    import cv2

    if encoding == "png" and not bytes(buf[:8]) == _PNG_MAGIC:
        raise WireError(f"{what}: 'image' is not a PNG (bad signature) although encoding is 'png'")
    if encoding == "jpeg" and not bytes(buf[:2]) == b"\xff\xd8":
        raise WireError(f"{what}: 'image' is not a JPEG (no SOI marker) although encoding is 'jpeg'")
    header = decode_cost(buf)
    if header is None or header.format != encoding:
        raise WireError(f"{what}: corrupt or truncated {encoding.upper()}: no readable image header")
    h, w = header.height, header.width
    if h == 0 or w == 0:
        raise WireError(f"{what}: zero-size {encoding.upper()} image {h}×{w}")
    if h > MAX_DIM or w > MAX_DIM:
        raise ImageTooLarge(f"{what}: {encoding.upper()} image {h}×{w} too large: each side must be ≤ {MAX_DIM}")
    if header.bits > 8:  # refused from the header: a 16-bit PNG is twice the pixels' bytes once decoded
        raise WireError(
            f"{what}: {encoding.upper()} has {header.bits}-bit samples; only 8-bit images are accepted"
        )
    if encoding == "png" and not bytes(buf[-12:]).endswith(b"IEND\xaeB`\x82"):
        raise WireError(f"{what}: truncated PNG (no IEND chunk at the end)")
    if encoding == "jpeg" and b"\xff\xd9" not in bytes(buf[-1024:]):
        raise WireError(f"{what}: truncated JPEG (no EOI marker at the end)")
    if header.problem:
        raise WireError(f"{what}: {header.problem}")
    if problem := cost_problem(header, MAX_IMAGE_BYTES):
        raise ImageTooLarge(f"{what}: {problem}")
    if shape is not None and (h, w) != shape[:2]:
        raise WireError(
            f"{what}: declared shape {list(shape)} but the {encoding.upper()} header says {h}×{w}"
        )
    img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise WireError(f"{what}: corrupt {encoding.upper()}: the image data could not be decoded")
    if img.nbytes > MAX_IMAGE_BYTES:
        raise WireError(f"{what}: decoded image of {img.nbytes} bytes too large (limit {MAX_IMAGE_BYTES})")
    if img.dtype != np.uint8:
        raise WireError(
            f"{what}: {encoding.upper()} has sample type {img.dtype}; only 8-bit images are accepted"
        )
    if img.ndim == 3:
        if img.shape[2] == 3:
            img = img[:, :, ::-1]  # BGR -> RGB
        elif img.shape[2] == 4:
            img = img[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
        elif img.shape[2] != 1:
            raise WireError(f"{what}: wrong channel count {img.shape[2]} in the {encoding.upper()}")
        img = np.ascontiguousarray(img)
    if shape is not None:
        c_decl = shape[2] if len(shape) == 3 else 1
        c_img = img.shape[2] if img.ndim == 3 else 1
        if c_decl != c_img:
            raise WireError(
                f"{what}: declared {c_decl} channel(s) but the {encoding.upper()} decodes to {c_img}"
            )
        img = img.reshape(shape)
    return img


# -- requests ---------------------------------------------------------------------------------------------


def encode_request(
    id: str,
    image: np.ndarray,
    encoding: str = "raw",
    model: str = "mnist",
    heatmap: bool = False,
    meta: dict | None = None,
    jpeg_quality: int = 95,
    source: str | None = None,
) -> bytes:
    """Pack one image request. ``image``: uint8 H×W or H×W×C (C in 1, 3, 4; RGB order); ``encoding``
    "raw" sends the pixels as-is, "png"/"jpeg" compress them with OpenCV (JPEG is lossy and has no alpha)."""
    what = "request"
    if not isinstance(id, str):
        raise WireError(f"{what}: 'id' must be a string, got {type(id).__name__}")
    _check_id(id, what)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise WireError(f"{what}: image dtype {image.dtype} not supported: images must be uint8")
    shape = _check_shape(list(image.shape), what)
    if encoding not in ENCODINGS:
        raise WireError(f"{what}: unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    meta = dict(meta or {})
    _check_meta(meta, what)
    if encoding == "raw":
        payload = np.ascontiguousarray(image).tobytes()
    else:
        import cv2

        img = image
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.ndim == 3 and img.shape[2] == 3:
            img = img[:, :, ::-1]
        elif img.ndim == 3 and img.shape[2] == 4:
            if encoding == "jpeg":
                raise WireError(f"{what}: JPEG cannot carry 4 channels (alpha); use png or raw")
            img = img[:, :, [2, 1, 0, 3]]
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if encoding == "jpeg" else []
        ok, enc = cv2.imencode(".png" if encoding == "png" else ".jpg", np.ascontiguousarray(img), params)
        if not ok:
            raise WireError(f"{what}: OpenCV could not encode the image as {encoding}")
        payload = enc.tobytes()
    obj = {
        "v": VERSION,
        "id": id,
        "image": payload,
        "encoding": encoding,
        "shape": list(shape),
        "dtype": "uint8",
        "model": model,
        "heatmap": bool(heatmap),
        "meta": meta,
    }
    if source is not None:
        _check_source(source, what)
        obj["source"] = source
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WireError(f"{what}: payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    return data


def encode_ref_request(
    id: str,
    ref: Ref,
    encoding: str = "jpeg",
    model: str = "mnist",
    heatmap: bool = False,
    meta: dict | None = None,
    source: str | None = None,
    shape: tuple[int, ...] | None = None,
) -> bytes:
    """Pack one request for an image by reference: the worker fetches ``ref.url`` (if its deployment allows that
    URL), checks ``ref.size`` and ``ref.sha256``, then decodes the file as ``encoding`` (png, jpeg, or raw with
    ``shape``)."""
    what = "request"
    _check_id(id, what)
    _check_ref(ref, what)
    if encoding not in ENCODINGS:
        raise WireError(f"{what}: unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if encoding == "raw" and shape is None:
        raise WireError(f"{what}: a raw image by reference needs its 'shape'")
    meta = dict(meta or {})
    _check_meta(meta, what)
    obj: dict[str, Any] = {"v": VERSION, "id": id, "ref": ref.url, "sha256": ref.sha256, "size": ref.size,
                           "encoding": encoding, "dtype": "uint8", "model": model, "heatmap": bool(heatmap),
                           "meta": meta}
    if shape is not None:
        obj["shape"] = list(_check_shape(list(shape), what))
    if source is not None:
        _check_source(source, what)
        obj["source"] = source
    return msgpack.packb(obj, use_bin_type=True)


def _check_ref(ref: Ref, what: str) -> None:
    url, size, digest = ref.url, ref.size, ref.sha256
    if not url or len(url) > MAX_REF_CHARS or not url.isprintable() or any(c.isspace() for c in url):
        raise WireError(f"{what}: field 'ref' must be a URL of 1 to {MAX_REF_CHARS} printable characters "
                        "without spaces")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_REF_BYTES:
        raise WireError(f"{what}: field 'size' must be the referenced file's size in bytes, 1 to {MAX_REF_BYTES}, "
                        f"got {size!r:.40}")
    if len(digest) != 64 or not set(digest) <= set(string.hexdigits.lower()):
        raise WireError(f"{what}: field 'sha256' must be the referenced file's SHA-256 as 64 lowercase hex digits")


def _decode_pixels(image: bytes, encoding: str, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    """The image in ``image`` (raw pixels of ``shape``, or a PNG/JPEG file), bounded before any allocation."""
    if len(image) == 0:
        raise WireError(f"{what}: zero-size 'image' (no bytes)")
    if encoding == "raw":
        if shape is None:
            raise WireError(f"{what}: missing field 'shape' (required for raw images)")
        expected = math.prod(shape)
        if len(image) != expected:
            raise WireError(
                f"{what}: shape {list(shape)} needs {expected} bytes of uint8 but 'image' has {len(image)}"
            )
        return np.frombuffer(image, dtype=np.uint8).reshape(shape)
    return _decode_compressed(image, encoding, shape, what)


def with_fetched(req: Request, payload: bytes) -> Request:
    """``req`` (by reference) with its image decoded from ``payload``, the referenced file's bytes as fetched
    and checked (size, digest: :mod:`worker.refs`); raises :class:`WireError` as an inline image would."""
    return replace(req, image=_decode_pixels(payload, req.encoding, req.declared_shape, f"request {req.id!r}"))


def decode_request(data: bytes) -> Request:
    """Validate and unpack one request; raises :class:`WireError` naming the problem. A request by reference
    comes back with ``image`` None and its ``ref``: fetch it, then :func:`with_fetched`."""
    what = "request"
    obj = _unpack(data, what)
    _check_version(obj, what)
    rid = _get(obj, "id", str, what, tname="a string")
    _check_id(rid, what)
    what = f"request {rid!r}"
    ref = None
    if "ref" in obj and "image" not in obj:
        ref = Ref(_get(obj, "ref", str, what, tname="a string (a URL)"),
                  _get(obj, "size", int, what, tname="an integer"),
                  _get(obj, "sha256", str, what, tname="a string"))
        _check_ref(ref, what)
        image = None
    elif "ref" in obj:
        raise WireError(f"{what}: give either 'image' (inline) or 'ref' (by reference), not both")
    else:
        image = _get(obj, "image", (bytes, bytearray), what, tname="binary (msgpack bin)")
    encoding = _get(obj, "encoding", str, what, default="raw", tname="a string")
    if encoding not in ENCODINGS:
        raise WireError(f"{what}: unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    dtype = _get(obj, "dtype", str, what, default="uint8", tname="a string")
    if dtype != "uint8":
        raise WireError(f"{what}: dtype {dtype!r} not supported: images must be 'uint8'")
    model = _get(obj, "model", str, what, default="mnist", tname="a string")
    if not model or len(model) > MAX_MODEL_CHARS:
        raise WireError(f"{what}: field 'model' must have 1 to {MAX_MODEL_CHARS} characters")
    heatmap = _get(obj, "heatmap", bool, what, default=False, tname="a boolean")
    source = _get(obj, "source", str, what, default=None, tname="a string")
    if source is not None:
        _check_source(source, what)
    meta = _get(obj, "meta", dict, what, default={}, tname="a map")
    _check_meta(meta, what)
    if "shape" in obj and obj["shape"] is not None:
        shape = _check_shape(obj["shape"], what)
    elif encoding == "raw":
        raise WireError(f"{what}: missing field 'shape' (required for raw images)")
    else:
        shape = None
    if ref is not None and encoding == "raw" and ref.size != math.prod(shape):  # refused before any fetch
        raise WireError(f"{what}: shape {list(shape)} needs {math.prod(shape)} bytes of uint8 but 'size' says "
                        f"{ref.size}")
    arr = None if image is None else _decode_pixels(image, encoding, shape, what)
    enq = meta.get("enqueued_at")
    enqueued_at = float(enq) if isinstance(enq, (int, float)) and not isinstance(enq, bool) else None
    if enqueued_at is not None and not math.isfinite(enqueued_at):
        enqueued_at = None
    return Request(id=rid, image=arr, model=model, heatmap=heatmap, meta=meta, encoding=encoding,
                   enqueued_at=enqueued_at, source=source, ref=ref, declared_shape=shape)


# -- verdicts ---------------------------------------------------------------------------------------------


def _default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot put {type(o).__name__} on the wire")


def heatmap_field(m: np.ndarray) -> dict:
    """The verdict's ``heatmap`` map for a 2-D float map: little-endian float16 bytes plus its shape."""
    m = np.asarray(m, dtype=np.float32)
    f16 = np.clip(np.nan_to_num(m, nan=0.0), -65504.0, 65504.0).astype("<f2")
    return {"dtype": "float16", "shape": list(m.shape), "data": f16.tobytes()}


def heatmap_array(verdict: dict) -> np.ndarray | None:
    """The verdict's heatmap as a float32 array, or None when it has none."""
    hm = verdict.get("heatmap")
    if not hm:
        return None
    shape = hm.get("shape")
    if hm.get("dtype") != "float16" or not isinstance(shape, list) or not isinstance(hm.get("data"), bytes):
        raise WireError("verdict: malformed 'heatmap' (need dtype 'float16', shape list, data bytes)")
    if len(hm["data"]) != 2 * math.prod(shape):
        raise WireError(f"verdict: heatmap shape {shape} does not match its {len(hm['data'])} bytes")
    return np.frombuffer(hm["data"], dtype="<f2").reshape(shape).astype(np.float32)


def encode_verdict(verdict: dict) -> bytes:
    """Pack one verdict map (numpy scalars are converted; ``v`` is set; long errors are truncated)."""
    v = dict(verdict)
    v.setdefault("v", VERSION)
    if not isinstance(v.get("id"), str):
        raise WireError("verdict: field 'id' must be a string")
    if isinstance(v.get("error"), str) and len(v["error"]) > MAX_ERROR_CHARS:
        v["error"] = v["error"][: MAX_ERROR_CHARS - 1] + "…"
    if isinstance(v.get("heatmap"), np.ndarray):
        v["heatmap"] = heatmap_field(v["heatmap"])
    data = msgpack.packb(v, use_bin_type=True, default=_default)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise WireError(f"verdict: payload of {len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    return data


def decode_verdict(data: bytes) -> dict:
    """Unpack and check one verdict map (version and id)."""
    obj = _unpack(data, "verdict")
    _check_version(obj, "verdict")
    _get(obj, "id", str, "verdict", tname="a string")
    return obj


def decode_alert(data: bytes) -> dict:
    """Unpack one message of the alerts channel: an adversarial verdict (the per-image policy), or an episode of
    a source's window: ``kind`` "episode" (the window policy: k of its last n images flagged) or "probing" (the
    query monitor: k of its last n images small edits of its recent ones), with ``source``, ``k``, ``n``, ``at``
    and the ``entries`` that opened it, each ``{"id", "stream_id"}``."""
    obj = _unpack(data, "alert")
    _check_version(obj, "alert")
    if obj.get("kind") not in EPISODE_KINDS:
        _get(obj, "id", str, "alert", tname="a string")
        return obj
    _get(obj, "source", str, "alert", tname="a string")
    entries = _get(obj, "entries", list, "alert", tname="an array")
    if not all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries):
        raise WireError(f"alert: every entry of an {obj['kind']} episode needs its 'id'")
    return obj


# -- dead letters -----------------------------------------------------------------------------------------


def encode_dead_letter(stream_id: str, raw: bytes | None, reason: str, **extra: Any) -> bytes:
    """Pack a dead-letter record; the offending payload is kept up to ``MAX_DEAD_PAYLOAD_BYTES``."""
    raw = bytes(raw or b"")
    obj = {
        "v": VERSION,
        "stream_id": stream_id,
        "reason": reason[:MAX_ERROR_CHARS],
        "payload": raw[:MAX_DEAD_PAYLOAD_BYTES],
        "payload_len": len(raw),
        "truncated": len(raw) > MAX_DEAD_PAYLOAD_BYTES,
        **extra,
    }
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def decode_dead_letter(data: bytes) -> dict:
    obj = _unpack(data, "dead letter")
    _check_version(obj, "dead letter")
    return obj
