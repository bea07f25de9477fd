"""Faults with worker processes: kill -9 a consumer, restart redis-server, SIGTERM."""

from __future__ import annotations

import pytest
import reliability


@pytest.mark.timeout(240)
def test_kill_9_a_consumer_mid_stream_loses_and_duplicates_nothing(tmp_path, nothing_lost):
    fig = reliability.kill_consumer(tmp_path, n=600, kills=2)
    nothing_lost(fig)
    assert fig.restarts == 2
    assert all(k > 0 for k in fig.extra["orphaned_at_kill"]), "each kill must orphan a batch in flight"
    assert fig.extra["left_with_killed_consumers"] == 0  # reclaimed by the survivors
    assert fig.pubsub_distinct == fig.valid  # pub/sub subscribers saw each verdict exactly once too
    assert fig.extra["dead_letters_total"] == 0


@pytest.mark.timeout(240)
def test_redis_restart_and_crash_mid_stream_worker_reconnects(tmp_path, nothing_lost):
    fig = reliability.redis_restart(tmp_path, n=600)
    nothing_lost(fig)
    assert fig.restarts == 2
    assert fig.extra["worker_alive_throughout"]
    assert fig.extra["dead_letters_total"] == 0


@pytest.mark.timeout(240)
def test_sigterm_finishes_the_batch_in_flight_and_exits_0(tmp_path, nothing_lost):
    fig = reliability.sigterm(tmp_path, n=500)
    nothing_lost(fig)
    assert fig.extra["in_flight_at_sigterm"] > 0
    assert fig.extra["pending_of_stopped_worker"] == 0  # its batch was published and acked before exit
    assert fig.extra["stopped_worker_stats"]["unpublished"] == 0
