"""Faults with Ray Serve: a model that hangs on one image; kill -9 a replica mid-stream; SIGTERM ``explainer serve``
under load. Each starts its own Ray (a minute or more on 2 cores): the hung model is in the default suite, the other
two are ``slow``: ``python -m pytest tests/faults -m slow``."""

from __future__ import annotations

import pytest
import reliability_serve


@pytest.mark.timeout(600)
def test_a_model_that_hangs_on_one_image_costs_only_that_image(tmp_path, nothing_lost):
    fig = reliability_serve.hung_stage(tmp_path, n=300)
    nothing_lost(fig, stopped_processes=False)
    assert fig.extra["valid_dead_lettered"] == [], fig.extra
    assert fig.dead_lettered == 1 and fig.extra["dead_kinds"] == ["max_deliveries"]
    assert not fig.extra["explainer_replaced"]  # the stage recovered by itself: a fresh thread, same replica


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_serve_replicas_mid_stream(tmp_path, nothing_lost):
    fig = reliability_serve.serve_replica_kill(tmp_path, n=600)
    nothing_lost(fig, stopped_processes=False)  # the app is drained and deleted in-process, no process exits
    assert fig.restarts == 2 and fig.extra["dead_letters_total"] == 0
    assert fig.extra["replicas_run_this_checkout"]
    http = fig.extra["http"]
    assert http["valid PNG"] == 200, http
    assert all(400 <= code < 500 or code == -1 for name, code in http.items() if name != "valid PNG"), http
    assert http["9 MiB body, chunked (limit 8 MiB)"] in (413, -1), http


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_explainer_serve_under_load(tmp_path, nothing_lost):
    fig = reliability_serve.serve_sigterm(tmp_path, n=600)
    nothing_lost(fig)
    assert fig.exit_codes[0] == 0
    assert fig.extra["pending_after_exit"] == 0
    assert fig.extra["verdicts_after_exit"] >= fig.extra["verdicts_at_sigterm"]
