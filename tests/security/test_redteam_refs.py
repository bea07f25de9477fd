"""Red team: images sent by reference (``worker.refs``). A request's URL must not make the worker read its own
files (``/etc/passwd``, ``..``, percent-encoded dots, a symlink out of the photo folder) or reach hosts the
operator did not list (credentials and fragment tricks, redirects to another port or the metadata address), and
a hostile server (a body longer than declared, a trickle, no answer) must cost at most ``timeout_s`` and
``size + 1`` bytes. A real HTTP server on loopback serves real JPEG bytes."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from worker.refs import RefFetcher, RefRejected, RefUnavailable
from worker.wire import WireError

PHOTO = cv2.imencode(".jpg", cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8),
                                              (5, 5), 0))[1].tobytes()
SHA = hashlib.sha256(PHOTO).hexdigest()
N = len(PHOTO)
HUGE = 64 * 1024 * 1024  # what /huge would send if read to the end


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 32 concurrent connects must not overflow the listen backlog


def _handler(log: list, written: list) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):  # no do_HEAD: a HEAD request is answered 501
        def log_message(self, *args):
            pass

        def send(self, status: int, body: bytes = b"", length: int | None = -1, **headers: str) -> None:
            self.send_response(status)
            if length is not None:
                self.send_header("Content-Length", str(len(body) if length == -1 else length))
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            log.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            try:
                if path == "/ok/photo.jpg":  # ignores Range
                    self.send(200, PHOTO)
                elif path == "/ranged/photo.jpg":
                    last = int(self.headers["Range"].split("-")[1])
                    self.send(206, PHOTO[:last + 1], Content_Range=f"bytes 0-{min(last, N - 1)}/{N}")
                elif path == "/nolength/photo.jpg":  # HTTP/1.0, the body ends with the connection
                    self.send(200, PHOTO, length=None)
                elif path == "/slow/photo.jpg":
                    time.sleep(0.2)
                    self.send(200, PHOTO)
                elif path == "/missing.jpg":
                    self.send(404, b"not here")
                elif path == "/redirect-local":
                    self.send(302, Location=f"http://127.0.0.1:{self.server.other_port}/ok/photo.jpg")
                elif path == "/redirect-metadata":
                    self.send(302, Location="http://169.254.169.254/latest/meta-data/")
                elif path == "/longer.jpg":  # a correct Content-Length for a body longer than declared
                    self.send(200, PHOTO + b"trailing bytes")
                elif path == "/shorter.jpg":
                    self.send(200, PHOTO[:-100])
                elif path == "/huge":  # no Content-Length, ignores Range, 64 MiB if read to the end
                    self.send(200, length=None)
                    for _ in range(HUGE // 65536):
                        self.wfile.write(b"\0" * 65536)
                        written[0] += 65536
                elif path == "/sleep":
                    time.sleep(3)
                    self.send(200, PHOTO)
                elif path == "/trickle":
                    self.send(200, length=N)
                    for i in range(5):
                        self.wfile.write(PHOTO[i:i + 1])
                        self.wfile.flush()
                        time.sleep(1)
                elif path == "/503":
                    self.send(503, b"busy")
                elif path == "/429":
                    self.send(429, b"slow down", Retry_After="1")
                elif path == "/403":
                    self.send(403, b"no")
                else:
                    self.send(404)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture(scope="module")
def server():
    """Two loopback servers: the allowed one and ``other`` (another port, never allowed)."""
    log: list = []
    written = [0]
    other_log: list = []
    other = _Server(("127.0.0.1", 0), _handler(other_log, [0]))
    main = _Server(("127.0.0.1", 0), _handler(log, written))
    main.other_port = other.server_port
    for s in (main, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    main.log, main.written, main.other_log = log, written, other_log
    main.base = f"http://127.0.0.1:{main.server_port}"
    yield main
    for s in (main, other):
        s.shutdown()
        s.server_close()


@pytest.fixture
def fetcher(server):
    with RefFetcher([server.base + "/"], timeout_s=1.0) as f:
        yield f


def _rejected(fetcher: RefFetcher, url: str, *words: str, size: int = N, sha: str = SHA) -> RefRejected:
    with pytest.raises(RefRejected) as e:
        fetcher.fetch(url, size, sha)
    for w in words:
        assert w in e.value.reason, e.value.reason
    assert isinstance(e.value, WireError)
    return e.value


# -- good fetches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ok/photo.jpg", "/ranged/photo.jpg", "/nolength/photo.jpg"])
def test_a_real_photo_is_fetched_with_one_get_and_its_digest_checked(server, fetcher, path):
    server.log.clear()
    assert fetcher.fetch(server.base + path, N, SHA) == PHOTO
    assert [m for m, *_ in server.log] == ["GET"]  # no HEAD, no size probe: a server without HEAD works
    assert server.log[0][2] == f"bytes=0-{N}"  # asks for one byte more than declared, to see a bigger object


def test_a_wrong_digest_is_rejected_with_both_digests(server, fetcher):
    e = _rejected(fetcher, server.base + "/ok/photo.jpg", "sha256 mismatch", SHA, sha="0" * 64)
    assert "0" * 64 in e.reason


def test_host_case_default_ports_and_scheme_case_are_normalised():
    f = RefFetcher(["https://Photos.Example.com", "http://127.0.0.1:8123/cams/"])
    assert f.check("https://photos.example.com:443/a.jpg") == "https://photos.example.com/a.jpg"
    assert f.check("HTTPS://PHOTOS.example.COM/a.jpg") == "https://photos.example.com/a.jpg"
    assert f.check("http://127.0.0.1:8123/cams/x/y%20z.jpg") == "http://127.0.0.1:8123/cams/x/y%20z.jpg"
    assert RefFetcher(["http://[::1]:8123/"]).check("http://[0:0::1]:8123/a") == "http://[::1]:8123/a"
    for url, why in [("https://photos.example.com:8443/a.jpg", "not in ref_allow"),
                     ("http://photos.example.com/a.jpg", "not in ref_allow"),
                     ("https://photos.example.com.evil.com/a.jpg", "not in ref_allow"),
                     ("https://evil.com/photos.example.com/a.jpg", "not in ref_allow"),
                     ("http://127.0.0.1:8124/cams/a.jpg", "not in ref_allow"),
                     ("http://127.0.0.1:8123/cams-evil/a.jpg", "outside the prefixes"),
                     ("http://127.0.0.1:8123/cam/a.jpg", "outside the prefixes"),
                     ("http://127.0.0.1:8123/", "outside the prefixes")]:
        with pytest.raises(RefRejected, match=why):
            f.check(url)


# -- what a server can do ---------------------------------------------------------------------------------


def test_a_missing_object_is_rejected(server, fetcher):
    _rejected(fetcher, server.base + "/missing.jpg", "not found", "404")
    _rejected(fetcher, server.base + "/403", "HTTP 403")


@pytest.mark.parametrize("path", ["/redirect-local", "/redirect-metadata"])
def test_redirects_are_not_followed(server, fetcher, path):
    server.other_log.clear()
    t = time.monotonic()
    _rejected(fetcher, server.base + path, "redirects are not followed", "302")
    assert time.monotonic() - t < 0.9  # 169.254.169.254 was not tried (it would hang until the timeout)
    assert server.other_log == []


def test_a_body_longer_or_shorter_than_declared_is_rejected(server, fetcher):
    _rejected(fetcher, server.base + "/longer.jpg", "bigger than its declared size")
    _rejected(fetcher, server.base + "/shorter.jpg", "shorter", "declared size")
    _rejected(fetcher, server.base + "/ranged/photo.jpg", "bigger", size=N - 1)
    _rejected(fetcher, server.base + "/ranged/photo.jpg", "shorter", size=N + 1)


def test_a_huge_body_is_not_read_to_the_end(server, fetcher):
    server.written[0] = 0
    t = time.monotonic()
    _rejected(fetcher, server.base + "/huge", "bigger than its declared size", size=1000)
    assert time.monotonic() - t < 1.0
    time.sleep(0.2)
    assert server.written[0] < HUGE // 2  # the connection was dropped, not drained


@pytest.mark.parametrize("path", ["/sleep", "/trickle"])
def test_a_server_that_stalls_or_trickles_is_unavailable_within_the_timeout(server, fetcher, path):
    t = time.monotonic()
    with pytest.raises(RefUnavailable, match="timed out after 1 s"):
        fetcher.fetch(server.base + path, N, SHA)
    assert time.monotonic() - t < 2.0


def test_a_refused_connection_and_busy_servers_are_unavailable(server, fetcher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = RefFetcher([f"http://127.0.0.1:{port}"], timeout_s=1.0)
    with pytest.raises(RefUnavailable, match="127.0.0.1"):
        closed.fetch(f"http://127.0.0.1:{port}/photo.jpg", N, SHA)
    with pytest.raises(RefUnavailable, match="HTTP 503"):
        fetcher.fetch(server.base + "/503", N, SHA)
    fetcher._down.clear()  # past the origin's cooldown
    with pytest.raises(RefUnavailable, match="HTTP 429"):
        fetcher.fetch(server.base + "/429", N, SHA)
    assert not issubclass(RefUnavailable, WireError)  # a retry, never a dead letter


# -- what a request can try -------------------------------------------------------------------------------


def test_by_default_no_reference_is_fetched(server, tmp_path):
    (tmp_path / "a.jpg").write_bytes(PHOTO)
    server.log.clear()
    for url in [server.base + "/ok/photo.jpg", (tmp_path / "a.jpg").as_uri(), "file:///etc/passwd",
                "s3://bucket/a.jpg", "http://169.254.169.254/"]:
        with pytest.raises(RefRejected, match="allows no references .*ref_allow"):
            RefFetcher().fetch(url, N, SHA)
    assert server.log == []


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:{port}@evil.example/ok/photo.jpg", "credentials"),
    ("http://evil.example#@127.0.0.1:{port}/ok/photo.jpg", "fragment"),
    ("http://127.0.0.1:{port}/ok/photo.jpg#x", "fragment"),
    ("http://user:pw@127.0.0.1:{port}/ok/photo.jpg", "credentials"),
    ("http://127.0.0.1:{port}\\@evil.example/", "backslash"),
    ("http://127.0.0.1:{port}/ok\\..\\..\\photo.jpg", "backslash"),
    ("http://127.0.0.1:{port}/ok/../../photo.jpg", "'..'"),
    ("http://127.0.0.1:{port}/ok/%2e%2e/photo.jpg", "'..'"),
    ("http://127.0.0.1:{port}/ok/%2E./photo.jpg", "'..'"),
    ("http://127.0.0.1:{port}/ok%2f..%2fphoto.jpg", "encoded '/'"),
    ("http://127.0.0.1:{port}/ok%5cphoto.jpg", "encoded '/'"),
    ("http://127.0.0.1:{port}/ok%00.jpg", "control"),
    ("http://127.0.0.1:{port}/ok/%zz.jpg", "percent escape"),
    (" http://127.0.0.1:{port}/ok/photo.jpg", "whitespace"),
    ("http://127.0.0.1:{port}/ok/photo.jpg\n", "whitespace"),
    ("http://127.0.0.1:{port}/ok/ph\toto.jpg", "whitespace"),
    ("http://127.0.0.1:{port}/ok/photo.jpg\u2028", "non-ASCII"),
    ("http://127。0。0。1:{port}/ok/photo.jpg", "non-ASCII"),
    ("http:/127.0.0.1:{port}/ok/photo.jpg", "absolute URL"),
    ("http://127.0.0.1:{port}:80/ok/photo.jpg", "malformed host"),
    ("http://127.0.0.1:99999/ok/photo.jpg", "invalid port"),
    ("http://[::1/ok/photo.jpg", "malformed"),
    ("ftp://127.0.0.1:{port}/ok/photo.jpg", "not supported"),
    ("gopher://127.0.0.1:{port}/", "not supported"),
    ("https://127.0.0.1:{port}/ok/photo.jpg", "not in ref_allow"),
    ("http://localhost:{port}/ok/photo.jpg", "not in ref_allow"),
    ("http://2130706433:{port}/ok/photo.jpg", "not in ref_allow"),
    ("http://169.254.169.254/latest/meta-data/", "not in ref_allow"),
    ("file:///etc/passwd", "not in ref_allow"),
])
def test_url_tricks_are_rejected_before_any_request(server, fetcher, url, why):
    server.log.clear()
    e = _rejected(fetcher, url.format(port=server.server_port), why)
    assert e.reason.startswith("ref ")
    assert server.log == []


@pytest.mark.parametrize("size,sha,why", [
    (0, SHA, "size must be an integer from 1"), (-5, SHA, "size"), (True, SHA, "size"), ("12", SHA, "size"),
    (16 * 1024 * 1024 + 1, SHA, "size"), (N, SHA.upper(), "lowercase hex"), (N, SHA[:-1], "sha256"),
    (N, None, "sha256"),
])
def test_a_malformed_size_or_digest_is_rejected_before_any_request(server, fetcher, size, sha, why):
    server.log.clear()
    _rejected(fetcher, server.base + "/ok/photo.jpg", why, size=size, sha=sha)
    assert server.log == []


@pytest.fixture
def photos(tmp_path):
    """tmp/photos/a.jpg (allowed), tmp/secret.txt and tmp/photos-evil/a.jpg (not), links in and out."""
    root = tmp_path / "photos"
    (root / "cam1").mkdir(parents=True)
    (root / "cam1" / "a.jpg").write_bytes(PHOTO)
    (tmp_path / "secret.txt").write_bytes(PHOTO)  # the same bytes: only the path check can refuse it
    (tmp_path / "photos-evil").mkdir()
    (tmp_path / "photos-evil" / "a.jpg").write_bytes(PHOTO)
    (root / "inside.jpg").symlink_to(root / "cam1" / "a.jpg")
    (root / "out.jpg").symlink_to(tmp_path / "secret.txt")
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "up").symlink_to(tmp_path)
    os.mkfifo(root / "fifo.jpg")
    return root


def test_file_refs_read_inside_the_allowed_directory_only(photos):
    f = RefFetcher([photos.as_uri() + "/"], timeout_s=1.0)
    base = photos.as_uri()
    assert f.fetch(base + "/cam1/a.jpg", N, SHA) == PHOTO
    assert f.fetch(base + "/inside.jpg", N, SHA) == PHOTO  # a link that stays inside is fine
    assert f.fetch(f"file://localhost{photos}/cam1/a.jpg", N, SHA) == PHOTO
    for url, why in [(base + "/out.jpg", "resolves outside"),
                     (base + "/passwd", "resolves outside"),
                     (base + "/up/secret.txt", "resolves outside"),
                     (base + "/../secret.txt", "'..'"),
                     (base + "/%2e%2e/secret.txt", "'..'"),
                     (base + "/cam1/..%2f..%2fsecret.txt", "encoded '/'"),
                     (photos.parent.as_uri() + "/photos-evil/a.jpg", "outside the prefixes"),
                     (photos.parent.as_uri() + "/secret.txt", "outside the prefixes"),
                     ("file:///etc/passwd", "outside the prefixes"),
                     (f"file://otherhost{photos}/cam1/a.jpg", "file:// URLs are local"),
                     (f"FILE://evil{photos}/cam1/a.jpg", "file:// URLs are local"),
                     (base + "/cam1/a.jpg?x=1", "query"),
                     (base + "/missing.jpg", "not found"),
                     (base + "/cam1", "not a regular file"),
                     (base + "/fifo.jpg", "not a regular file")]:
        _rejected(f, url, why)
    _rejected(f, base + "/cam1/a.jpg", "shorter", size=N + 1)
    _rejected(f, base + "/cam1/a.jpg", "bigger", size=N - 1)


def test_allow_entries_are_validated():
    for entry, why in [("ftp://host/", "not supported"), ("http://", "no host"), ("photos.example.com", "absolute"),
                       ("http://user@host/", "credentials"), ("https://h/a/../b", "'..'"), ("file://host/srv", "local"),
                       ("http://h/?a=1", "query"), ("http://h/#f", "fragment"), ("http://h//x/", "empty path"),
                       ("http://h /", "whitespace")]:
        with pytest.raises(ValueError, match=why):
            RefFetcher([entry])
    with pytest.raises(ValueError, match="list of URL prefixes"):
        RefFetcher("https://photos.example.com")  # type: ignore[arg-type]
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install s3fs"):
            RefFetcher(["s3://my-bucket/cams/"])


def test_object_store_refs_are_read_bounded_through_fsspec(monkeypatch):
    """s3:// without s3fs installed: fsspec's memory filesystem stands in for the bucket."""
    import fsspec

    import worker.refs as refs

    monkeypatch.setattr(refs, "_installed", lambda package: True)
    mem = fsspec.filesystem("memory", skip_instance_cache=True)
    mem.pipe_file("/my-bucket/cams/a.jpg", PHOTO)
    f = RefFetcher(["s3://my-bucket/cams/"], timeout_s=1.0)
    monkeypatch.setattr(f, "_filesystem", lambda scheme: mem)
    assert f.fetch("s3://my-bucket/cams/a.jpg", N, SHA) == PHOTO
    _rejected(f, "s3://my-bucket/cams/b.jpg", "not found")
    _rejected(f, "s3://my-bucket/cams/a.jpg", "bigger", size=N - 1)
    _rejected(f, "s3://my-bucket/other/a.jpg", "outside the prefixes")
    _rejected(f, "s3://other-bucket/cams/a.jpg", "not in ref_allow")
    _rejected(f, "s3://my-bucket:9000/cams/a.jpg", "invalid port")


# -- many at once -----------------------------------------------------------------------------------------


def test_fetch_many_is_concurrent_and_keeps_per_ref_errors_in_order(server, fetcher):
    refs = [(f"{server.base}/slow/photo.jpg?i={i}", N, SHA) for i in range(32)]
    refs[3] = (server.base + "/missing.jpg", N, SHA)
    refs[10] = (server.base + "/slow/photo.jpg", N, "f" * 64)
    refs[17] = ("file:///etc/passwd", N, SHA)
    refs[25] = (server.base + "/503", N, SHA)
    refs[30] = ("not a ref",)  # type: ignore[assignment]
    t = time.monotonic()
    out = fetcher.fetch_many(refs)
    elapsed = time.monotonic() - t
    assert elapsed < 3.0, f"32 refs of 0.2 s each took {elapsed:.1f} s: fetched one after another?"
    assert len(out) == 32
    kinds = {3: RefRejected, 10: RefRejected, 17: RefRejected, 25: RefUnavailable, 30: RefRejected}
    for i, got in enumerate(out):
        if i in kinds:
            assert type(got) is kinds[i], (i, got)
        else:
            assert got == PHOTO, (i, got)
    assert "not found" in out[3].reason and "sha256 mismatch" in out[10].reason
    assert fetcher.fetch_many([]) == []


def test_an_origin_that_failed_is_not_waited_on_again_until_its_cooldown(server, fetcher):
    """A store that is down costs one timeout, not one per image: its other refs fail at once for ``cooldown_s``,
    and after the cooldown the origin is tried again."""
    t = time.monotonic()
    first, again = fetcher.fetch_many([(server.base + "/sleep", N, SHA)]), None
    assert isinstance(first[0], RefUnavailable) and time.monotonic() - t >= 0.9
    t = time.monotonic()
    again = fetcher.fetch_many([(server.base + "/ok/photo.jpg", N, SHA)] * 3)
    assert all(isinstance(r, RefUnavailable) and "tried again after" in str(r) for r in again)
    assert time.monotonic() - t < 0.5
    fetcher._down.clear()  # the cooldown over (``cooldown_s`` is the timeout here: 1 s)
    assert fetcher.fetch_many([(server.base + "/ok/photo.jpg", N, SHA)]) == [PHOTO]


def test_logs_and_dead_letters_never_show_a_signed_urls_query(server, fetcher):
    with pytest.raises(RefRejected) as err:
        fetcher.fetch(server.base + "/missing.jpg?X-Amz-Signature=s3cr3t&token=abc", N, SHA)
    assert "s3cr3t" not in str(err.value) and "abc" not in str(err.value) and "/missing.jpg?..." in str(err.value)
