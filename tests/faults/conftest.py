"""Fault tests: real redis-server processes, real worker processes (``worker.standalone``) and a real Ray Serve
app; loopback only. Sizes here are small so the default suite stays fast; ``scripts/reliability.py`` runs the
same scenarios at full size and writes ``reports/reliability/report.md``."""

from __future__ import annotations

import pytest


@pytest.fixture
def nothing_lost():
    return _nothing_lost


def _nothing_lost(fig, stopped_processes: bool = True) -> None:
    """The at-least-once contract as a subscriber sees it: every message id has exactly one verdict, no entry
    is left pending, and (``stopped_processes``) every worker process that was asked to stop exited 0."""
    assert fig.lost == 0, fig
    assert fig.verdicts == fig.valid > 0, fig
    assert fig.dup_stream == 0 and fig.dup_pubsub == 0, fig
    assert fig.pending_after == 0, fig
    if stopped_processes:
        assert fig.exit_codes and all(rc == 0 for rc in fig.exit_codes), fig
