"""Images sent by reference: a request names a URL, the object's sha256 and its size, and the worker fetches it.

A reference makes the worker open a URL a producer chose, so by default it opens none: only URLs under a prefix
the operator listed (``ref_allow``) are fetched, lest a request make the worker read its own files
(``file:///etc/passwd``, a symlink out of the photo folder) or probe the network (a cloud metadata address, an
internal service, a redirect to either). Each URL is parsed strictly and refused when ambiguous (credentials,
fragments, backslashes, dot segments, percent-encoded ``.``/``/``, whitespace or control characters); what is
checked is exactly what is opened. Fetches are bounded: at most ``size + 1`` bytes are read, within
``timeout_s``, redirects are never followed, and the bytes must hash to the declared sha256.

Failures are either permanent, :class:`RefRejected` (a :class:`~worker.wire.WireError`: the request is wrong and
goes to the dead letters with its reason), or transient, :class:`RefUnavailable` (a timeout, a refused
connection, HTTP 5xx or 429: the entry stays pending and is retried).

Bytes come through fsspec: for ``http(s)://``, one GET per object on the session and event loop of fsspec's
``HTTPFileSystem`` (fsspec's own reads issue a HEAD, or read a whole body a server sends despite a Range header);
for ``file://`` and ``s3://`` (which needs ``s3fs`` installed), the filesystem's ``open`` on a thread pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import ipaddress
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from worker import wire
from worker.wire import WireError

SCHEMES = ("file", "http", "https", "s3")
DEFAULT_PORTS = {"http": 80, "https": 443}
COOLDOWN_S = 5.0  # an origin that failed transiently is not tried again for this long (at most the timeout)
REF_TIMEOUT_S = 10.0  # fetching one referenced image gives up after this long (ref_timeout_s)
_PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs"}  # what fsspec needs for each scheme
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_NETLOC = re.compile(r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?))"
                     r"(?::(?P<port>[0-9]{1,5}))?")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"  # RFC 3986 pchar, kept as is when a path is re-quoted


class RefRejected(WireError):
    """A reference that will never be fetched as sent (not allowed, missing, wrong size or digest, malformed);
    ``reason`` says which."""


class RefUnavailable(Exception):
    """A reference that could not be fetched now (timeout, refused connection, HTTP 5xx or 429): retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Url:
    """A parsed URL: scheme and host lower-cased, the port explicit, the path as percent-decoded segments."""

    scheme: str
    host: str  # "" for file://; the bucket for s3://; an IPv6 address in brackets
    port: int | None
    segments: tuple[str, ...]
    query: str | None

    @property
    def origin(self) -> str:
        default = DEFAULT_PORTS.get(self.scheme)
        port = f":{self.port}" if self.port is not None and self.port != default else ""
        return f"{self.scheme}://{self.host}{port}"

    @property
    def path(self) -> str:
        """The decoded path ("/a/b"), as a local file path or an object key under the bucket."""
        return "/" + "/".join(self.segments)

    @property
    def target(self) -> str:
        """What is opened: the URL re-quoted from the checked segments (http), a local path, or ``bucket/key``."""
        if self.scheme == "file":
            return self.path
        if self.scheme == "s3":
            return f"{self.host}{self.path}"
        path = "/" + "/".join(quote(s, safe=_SEGMENT_SAFE) for s in self.segments)
        return self.origin + path + (f"?{self.query}" if self.query is not None else "")


def _parse(url: object) -> _Url:
    """Parse ``url`` strictly; ValueError (with the reason) for anything malformed or ambiguous."""
    if not isinstance(url, str):
        raise ValueError(f"must be a string, got {type(url).__name__}")
    if not url or len(url) > wire.MAX_REF_CHARS:
        raise ValueError(f"must have 1 to {wire.MAX_REF_CHARS} characters")
    if not all("!" <= c <= "~" for c in url):
        raise ValueError("contains whitespace, control or non-ASCII characters (percent-encode them)")
    if "\\" in url:
        raise ValueError("contains a backslash")
    if "#" in url:
        raise ValueError("has a fragment ('#')")
    m = _SCHEME.match(url)
    if not m:
        raise ValueError("is not an absolute URL (scheme://host/path)")
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not supported (only {', '.join(SCHEMES)})")
    try:
        parts = urlsplit(url)
    except ValueError as e:  # an unclosed "[" of an IPv6 host
        raise ValueError(f"is malformed ({e})") from None
    if "@" in parts.netloc:
        raise ValueError("has credentials or '@' before the host")
    host, port = "", None
    if parts.netloc:
        n = _NETLOC.fullmatch(parts.netloc)
        if not n:
            raise ValueError(f"malformed host {parts.netloc!r}")
        if n["v6"]:
            try:
                host = f"[{ipaddress.IPv6Address(n['v6']).compressed}]"
            except ValueError:
                raise ValueError(f"malformed IPv6 host {parts.netloc!r}") from None
        else:
            host = n["name"].lower()
        if n["port"]:
            port = int(n["port"])
            if not 1 <= port <= 65535 or scheme not in DEFAULT_PORTS:
                raise ValueError(f"invalid port in {parts.netloc!r}")
    if scheme == "file":
        if host not in ("", "localhost") or port is not None:
            raise ValueError(f"names another host ({parts.netloc!r}): file:// URLs are local (file:///path)")
        host = ""
    elif not host:
        raise ValueError("has no host")
    if scheme in DEFAULT_PORTS:
        port = port or DEFAULT_PORTS[scheme]
    elif "?" in url:
        raise ValueError(f"has a query: {scheme}:// URLs take none")
    path = parts.path
    if path and not path.startswith("/"):
        raise ValueError("path must start with '/'")
    if _BAD_ESCAPE.search(path):
        raise ValueError("has a malformed percent escape")
    segments = []
    for raw in path[1:].split("/") if path else []:
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise ValueError("has a percent escape that is not UTF-8") from None
        if seg in (".", ".."):
            raise ValueError("has a '.' or '..' path segment (plain or percent-encoded)")
        if any(c in "/\\" or c < " " or c == "\x7f" for c in seg):
            raise ValueError("has an encoded '/', '\\' or control character in a path segment")
        segments.append(seg)
    if scheme == "file" and not segments:
        raise ValueError("has no path")
    return _Url(scheme, host, port, tuple(segments), parts.query if scheme in DEFAULT_PORTS and "?" in url else None)


def _show(url: object) -> str:
    """``url`` for logs and dead letters: without its query (a signed URL's token lives there) or fragment."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    bare = re.split(r"[?#]", url, maxsplit=1)[0]
    bare = bare if len(bare) <= 200 else bare[:200] + "..."
    return repr(bare + ("?..." if len(bare) < len(url) else ""))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class RefFetcher:
    """Fetches referenced images from URLs under the prefixes in ``allow`` (empty: none at all).

    An ``allow`` entry is a URL prefix naming a scheme and host and optionally a path: ``https://photos.example.com``,
    ``http://127.0.0.1:8123/cams/``, ``s3://my-bucket/cams/``, ``file:///srv/photos/``. A URL is allowed when its
    scheme and host:port equal an entry's (host case-insensitive, default ports implied) and its path lies under
    the entry's path, segment by segment; a ``file://`` URL must also resolve, symlinks followed, inside the
    entry's directory resolved likewise. Fetches run ``workers`` at a time, each bounded by ``timeout_s`` and by
    ``max_bytes``. The operator must trust what the allowed hosts' names resolve to.
    """

    def __init__(self, allow: Sequence[str] = (), timeout_s: float = REF_TIMEOUT_S, max_bytes: int = wire.MAX_REF_BYTES,
                 workers: int = 8) -> None:
        if isinstance(allow, str):
            raise ValueError("ref_allow must be a list of URL prefixes, not one string")
        entries = []
        for entry in allow:
            try:
                parsed = _parse(entry)
            except ValueError as e:
                raise ValueError(f"ref_allow entry {_show(entry)} {e}") from None
            if parsed.query is not None:
                raise ValueError(f"ref_allow entry {_show(entry)} has a query: give a scheme, host and path")
            if parsed.segments and parsed.segments[-1] == "":  # "/cams/" and "/cams" name the same prefix
                parsed = _Url(parsed.scheme, parsed.host, parsed.port, parsed.segments[:-1], None)
            if "" in parsed.segments:
                raise ValueError(f"ref_allow entry {_show(entry)} has an empty path segment ('//')")
            package = _PACKAGES.get(parsed.scheme)
            if package and not _installed(package):
                raise ValueError(f"ref_allow entry {_show(entry)}: {parsed.scheme}:// needs the {package} package "
                                 f"(pip install {package})")
            entries.append(parsed)
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.allow: tuple[str, ...] = tuple(e.origin + (e.path if e.segments else "") for e in entries)
        self.timeout_s = float(timeout_s)
        self.max_bytes = max_bytes
        self.workers = workers
        self._entries = tuple(entries)
        self._filesystems: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.cooldown_s = min(self.timeout_s, COOLDOWN_S)
        self._down: dict[str, float] = {}  # origin -> monotonic time before which its refs fail at once

    # -- checks ---------------------------------------------------------------------------------------------

    def check(self, url: str) -> str:
        """Raise :class:`RefRejected` unless ``url`` is allowed (before any I/O, symlinks aside); return what
        would be opened: the URL normalised, or a local path for ``file://``."""
        return self._allowed(url)[0].target

    def _allowed(self, url: object) -> tuple[_Url, list[_Url]]:
        if not self._entries:
            raise RefRejected(f"ref {_show(url)}: this deployment allows no references (ref_allow is empty): "
                              f"send the image inline, or have the operator list the URL prefix in ref_allow")
        try:
            ref = _parse(url)
        except ValueError as e:
            raise RefRejected(f"ref {_show(url)} {e}") from None
        same_origin = [e for e in self._entries if (e.scheme, e.host, e.port) == (ref.scheme, ref.host, ref.port)]
        if not same_origin:
            raise RefRejected(f"ref {_show(url)}: {ref.origin} is not in ref_allow")
        matched = [e for e in same_origin if ref.segments[:len(e.segments)] == e.segments]
        if not matched:
            raise RefRejected(f"ref {_show(url)}: path {ref.path!r} is outside the prefixes ref_allow gives "
                              f"{ref.origin}")
        return ref, matched

    def _checked(self, ref: tuple[str, int, str]) -> tuple[_Url, list[_Url], int, str]:
        try:
            url, size, sha256 = ref
        except (TypeError, ValueError):
            raise RefRejected("a reference is (url, size, sha256)") from None
        parsed, matched = self._allowed(url)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= self.max_bytes:
            raise RefRejected(f"ref {_show(url)}: size must be an integer from 1 to {self.max_bytes} bytes, "
                              f"got {size!r:.40}")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise RefRejected(f"ref {_show(url)}: sha256 must be 64 lowercase hex characters, got {sha256!r:.80}")
        return parsed, matched, size, sha256

    # -- fetching -------------------------------------------------------------------------------------------

    def fetch(self, url: str, size: int, sha256: str) -> bytes:
        """The ``size`` bytes at ``url``, checked against ``sha256``; :class:`RefRejected` or
        :class:`RefUnavailable` otherwise."""
        out = self.fetch_many([(url, size, sha256)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def fetch_many(self, refs: Sequence[tuple[str, int, str]]) -> list[bytes | Exception]:
        """Fetch ``(url, size, sha256)`` refs concurrently: per ref, in order, its bytes or the
        :class:`RefRejected` / :class:`RefUnavailable` it failed with (never raised). An origin (scheme, host and
        port) that failed transiently is not tried again for ``cooldown_s``: its refs fail at once, so that a photo
        store that is down costs the stream one timeout, not one per image."""
        if not refs:
            return []
        from fsspec.asyn import get_loop, sync

        out: list[bytes | Exception | None] = [None] * len(refs)
        origins = [self._origin(ref) for ref in refs]
        now = time.monotonic()
        todo = []
        for i, origin in enumerate(origins):
            until = self._down.get(origin, 0.0) if origin else 0.0
            if until > now:
                out[i] = RefUnavailable(f"ref {_show(refs[i][0])}: {origin} failed within the last "
                                        f"{self.cooldown_s:g} s; tried again after {until - now:.1f} s")
            else:
                todo.append(i)
        got = sync(get_loop(), self._gather, [refs[i] for i in todo]) if todo else []
        for i, result in zip(todo, got, strict=True):
            out[i] = result
            if isinstance(result, RefUnavailable) and origins[i]:
                self._down[origins[i]] = time.monotonic() + self.cooldown_s
            elif not isinstance(result, Exception) and origins[i]:
                self._down.pop(origins[i], None)
        return out  # type: ignore[return-value]

    def _origin(self, ref: Any) -> str | None:
        """The scheme, host and port a ref would be fetched from; None when it is not even a URL."""
        try:
            return _parse(ref[0]).origin
        except (ValueError, TypeError, IndexError):
            return None

    async def _gather(self, refs: list) -> list[bytes | Exception]:
        gate = asyncio.Semaphore(self.workers)

        async def one(ref: Any) -> bytes | Exception:
            try:
                async with gate:
                    return await self._fetch_one(ref)
            except (RefRejected, RefUnavailable) as e:
                return e
            except Exception as e:  # an error no branch foresaw: keep the entry for a retry rather than drop it
                return RefUnavailable(f"ref {_show(ref[0] if isinstance(ref, tuple) and ref else ref)}: "
                                      f"{type(e).__name__}: {e}")

        return list(await asyncio.gather(*(one(r) for r in refs)))

    async def _fetch_one(self, ref: Any) -> bytes:
        parsed, matched, size, sha256 = self._checked(ref)
        shown = _show(ref[0])
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if parsed.scheme in DEFAULT_PORTS:
                    data = await self._get_http(parsed, size, shown)
                elif parsed.scheme == "file":
                    data = await loop.run_in_executor(self._executor(), self._read_file, parsed, matched, size, shown)
                else:
                    data = await loop.run_in_executor(self._executor(), self._read_object, parsed, size, shown)
        except TimeoutError:
            raise RefUnavailable(f"ref {shown}: timed out after {self.timeout_s:g} s") from None
        _check_size(len(data), size, shown)
        digest = (await loop.run_in_executor(self._executor(), hashlib.sha256, data)).hexdigest()
        if digest != sha256:
            raise RefRejected(f"ref {shown}: sha256 mismatch: the object hashes to {digest}, the request says {sha256}")
        return data

    async def _get_http(self, ref: _Url, size: int, shown: str) -> bytes:
        import aiohttp
        import yarl

        session = await self._filesystem("http").set_session()
        headers = {"Range": f"bytes=0-{size}", "Accept-Encoding": "identity"}  # size + 1 bytes tell "bigger"
        try:
            async with session.get(yarl.URL(ref.target, encoded=True), headers=headers, allow_redirects=False) as r:
                status = r.status
                if 300 <= status < 400:
                    to = r.headers.get("Location", "")
                    raise RefRejected(f"ref {shown}: HTTP {status} redirect to {_show(to)}: redirects are not "
                                      f"followed, reference the final URL")
                if status in (404, 410):
                    raise RefRejected(f"ref {shown}: not found (HTTP {status})")
                if status in (408, 425, 429) or status >= 500:
                    raise RefUnavailable(f"ref {shown}: HTTP {status} {r.reason or ''}".rstrip())
                if status == 416:  # not even byte 0 exists
                    raise RefRejected(f"ref {shown}: the object is empty, shorter than its declared size of {size} "
                                      f"bytes (HTTP 416)")
                if status not in (200, 206):
                    raise RefRejected(f"ref {shown}: HTTP {status} {r.reason or ''}".rstrip())
                total = _content_range_total(r.headers.get("Content-Range")) if status == 206 else r.content_length
                if total is not None:
                    _check_size(total, size, shown)
                buf = bytearray()
                while len(buf) <= size:
                    chunk = await r.content.read(size + 1 - len(buf))
                    if not chunk:
                        break
                    buf += chunk
                if len(buf) > size:
                    r.close()  # drop the connection rather than drain a body of any length
                return bytes(buf)
        except aiohttp.ClientSSLError as e:
            raise RefRejected(f"ref {shown}: TLS failed ({type(e).__name__}: {e})") from None
        except aiohttp.InvalidURL as e:
            raise RefRejected(f"ref {shown}: invalid URL ({e})") from None
        except aiohttp.ClientError as e:  # refused, reset, DNS, a malformed or cut response
            raise RefUnavailable(f"ref {shown}: {type(e).__name__}: {e}") from None

    def _read_file(self, ref: _Url, matched: list[_Url], size: int, shown: str) -> bytes:
        real = os.path.realpath(ref.path)
        if not any(_under(real, os.path.realpath(e.path)) for e in matched):
            raise RefRejected(f"ref {shown}: resolves outside the directories ref_allow gives (a symlink?)")
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                raise RefRejected(f"ref {shown}: not a regular file")
            _check_size(st.st_size, size, shown)
            with self._filesystem("file").open(real, "rb") as f:
                opened = f"/proc/self/fd/{f.fileno()}"  # what was opened, should a directory have moved meanwhile
                if os.path.exists(opened) and not any(_under(os.path.realpath(opened), os.path.realpath(e.path))
                                                      for e in matched):
                    raise RefRejected(f"ref {shown}: resolves outside the directories ref_allow gives")
                return _read_bounded(f, size)
        except FileNotFoundError:
            raise RefRejected(f"ref {shown}: not found") from None
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise RefRejected(f"ref {shown}: cannot be read ({type(e).__name__})") from None
        except OSError as e:
            raise RefUnavailable(f"ref {shown}: {type(e).__name__}: {e}") from None

    def _read_object(self, ref: _Url, size: int, shown: str) -> bytes:
        try:
            with self._filesystem(ref.scheme).open(ref.target, "rb", block_size=size + 1, cache_type="none") as f:
                if isinstance(getattr(f, "size", None), int):
                    _check_size(f.size, size, shown)
                return _read_bounded(f, size)
        except FileNotFoundError:
            raise RefRejected(f"ref {shown}: not found") from None
        except PermissionError as e:
            raise RefRejected(f"ref {shown}: access denied ({e})") from None
        except (RefRejected, RefUnavailable):
            raise
        except Exception as e:  # botocore's and the network's errors are many; all are worth a retry
            raise RefUnavailable(f"ref {shown}: {type(e).__name__}: {e}") from None

    # -- resources ------------------------------------------------------------------------------------------

    def _filesystem(self, scheme: str) -> Any:
        """One fsspec filesystem per protocol for this fetcher (fsspec's instance cache is skipped: its instances
        are shared process-wide and keyed by arguments)."""
        protocol = "http" if scheme in DEFAULT_PORTS else scheme
        with self._lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                import fsspec

                if protocol == "http":
                    fs = fsspec.filesystem("http", skip_instance_cache=True, get_client=_http_client,
                                           client_kwargs={"timeout_s": self.timeout_s})
                elif protocol == "s3":
                    fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
                        "connect_timeout": self.timeout_s, "read_timeout": self.timeout_s,
                        "retries": {"max_attempts": 1}})
                else:
                    fs = fsspec.filesystem(protocol)
                self._filesystems[protocol] = fs
            return fs

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ref-fetch")
            return self._pool

    def close(self) -> None:
        """Release the thread pool and the HTTP session (a later fetch makes new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
            http = self._filesystems.pop("http", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        session = getattr(http, "_session", None)
        if session is not None:
            from fsspec.asyn import get_loop, sync

            sync(get_loop(), session.close)

    def __enter__(self) -> RefFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _http_client(loop: Any = None, timeout_s: float = REF_TIMEOUT_S, **kwargs: Any) -> Any:
    """The aiohttp session behind fsspec's HTTPFileSystem: bytes as sent (no decompression: the digest is of the
    stored object, and a small gzip body cannot inflate past the bound), no cookies, no proxy from the
    environment, every request bounded by ``timeout_s``."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False,
                                 cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, **kwargs)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _check_size(n: int, size: int, shown: str) -> None:
    if n > size:
        raise RefRejected(f"ref {shown}: the object is bigger than its declared size of {size} bytes")
    if n < size:
        raise RefRejected(f"ref {shown}: the object is shorter ({n} bytes) than its declared size of {size} bytes")


def _content_range_total(value: str | None) -> int | None:
    """The complete length in a ``Content-Range: bytes 0-N/TOTAL`` header, None when absent or unknown."""
    m = re.fullmatch(r"\s*bytes\s+\d+-\d+/(\d+)\s*", value or "")
    return int(m.group(1)) if m else None


def _read_bounded(f: Any, size: int) -> bytes:
    """At most ``size + 1`` bytes of ``f`` (one more than declared tells a bigger object)."""
    buf = bytearray()
    while len(buf) <= size:
        chunk = f.read(size + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
