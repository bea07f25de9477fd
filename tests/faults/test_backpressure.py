"""Issue 6, fault 5: a producer far faster than the worker; the trimming policy never drops unread entries."""

from __future__ import annotations

import pytest

from worker import reliability


@pytest.mark.timeout(300)
def test_fast_producer_keeps_worker_memory_flat_and_loses_nothing(tmp_path, nothing_lost):
    fig = reliability.backpressure(tmp_path, n=1500, pad_kib=128)
    nothing_lost(fig)
    x = fig.extra
    assert x["speed_ratio"] >= 5, x  # the producer really outran the worker
    assert x["max_stream_len"] >= 500, x  # a real backlog built up (in Redis) ...
    assert x["backlog_mib"] >= 150, x
    assert x["rss_growth_mib"] < 0.5 * x["backlog_mib"], x  # ... and not in the worker
    assert x["stream_len_after"] <= 300, x  # acked entries were trimmed once read
    assert x["trimmed_by_worker"] >= 1000, x


def test_backlog_cap_refuses_the_producer_and_trimming_keeps_unread_entries(tmp_path):
    fig = reliability.backlog_full(tmp_path, max_backlog=500)
    x = fig.extra
    assert x["refused"] and "backpressure" in x["message"], x
    assert 500 <= x["pushed"] == fig.sent < 600, x  # stopped at the cap (plus one pipeline chunk at most)
    assert x["trimmed"] == 0 and x["stream_len_after_trim"] == fig.sent and fig.lost == 0, x
