"""Red team: ways HTTP authentication could be off by accident. An empty or blank token, a token file of spaces,
a Serve config that puts the proxy on 0.0.0.0 without a token, and documentation routes that answer without it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from worker.cli import app
from worker.serve_app import HTTP_TOKEN_ENV, check_http_exposure, http, http_token

GOOD = "s3cret-token-0123456789"


@pytest.mark.parametrize("value", ["", "   ", "\t\n", "short"])
def test_an_empty_blank_or_short_token_in_the_environment_is_an_error(monkeypatch, value):
    monkeypatch.setenv(HTTP_TOKEN_ENV, value)
    with pytest.raises(ValueError, match="at least 16 printable characters"):
        http_token(None)


@pytest.mark.parametrize("content", ["", "    ", "  \n\n", "two words in it here"])
def test_a_token_file_of_spaces_or_with_spaces_is_an_error(tmp_path, monkeypatch, content):
    monkeypatch.delenv(HTTP_TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text(content)
    with pytest.raises(ValueError, match="without whitespace"):
        http_token(str(tmp_path / "token"))


def test_a_token_is_read_trimmed_and_none_only_when_nothing_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(HTTP_TOKEN_ENV, raising=False)
    assert http_token(None) is None
    (tmp_path / "token").write_text(f"  {GOOD}\n")
    assert http_token(str(tmp_path / "token")) == GOOD
    monkeypatch.setenv(HTTP_TOKEN_ENV, GOOD)
    assert http_token(None) == GOOD


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "explainer.example.com", None])
def test_a_proxy_beyond_loopback_without_a_token_is_refused(host):
    with pytest.raises(ValueError, match="beyond this machine"):
        check_http_exposure(host, None)
    check_http_exposure(host, GOOD)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.53"])
def test_loopback_needs_no_token(host):
    check_http_exposure(host, None)


def test_explainer_serve_refuses_before_starting_anything(monkeypatch):
    """An empty EXPLAINER_HTTP_TOKEN used to pass the CLI's check (and then turn authentication off)."""
    monkeypatch.setenv(HTTP_TOKEN_ENV, "")
    done = CliRunner().invoke(app, ["serve", "--http-host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:1/0"])
    assert done.exit_code == 2 and "at least 16 printable characters" in " ".join(done.output.split())
    monkeypatch.delenv(HTTP_TOKEN_ENV)
    done = CliRunner().invoke(app, ["serve", "--http-host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:1/0"])
    assert done.exit_code == 2 and "beyond this machine" in " ".join(done.output.split())  # rich wraps lines


def test_no_documentation_route_answers_without_the_token():
    """FastAPI's /docs, /redoc and /openapi.json are off: they answered without the token."""
    assert (http.docs_url, http.redoc_url, http.openapi_url) == (None, None, None)


@pytest.mark.timeout(300)
def test_a_serve_config_with_the_proxy_on_every_address_and_no_token_does_not_deploy(tmp_path, monkeypatch):
    """The path `serve run` and KubeRay take (the config's http_options.host, no CLI in between): the Ingress
    reads where Serve's proxy listens and refuses to start without a token."""
    from worker.embedded import embedded_stack
    from worker.local_redis import free_port

    monkeypatch.delenv(HTTP_TOKEN_ENV, raising=False)
    with pytest.raises(Exception, match="beyond this machine"):  # noqa: B017 - Serve wraps the replica's error
        with embedded_stack(None, data_dir=tmp_path, http_port=free_port(), http_host="0.0.0.0",
                            overrides={"redis_url": None}):
            pass
