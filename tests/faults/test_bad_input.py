"""1,000 bad entries interleaved 1:1 with valid images, into one worker process."""

from __future__ import annotations

import pytest
import reliability


@pytest.mark.timeout(300)
def test_every_bad_entry_is_dead_lettered_every_valid_one_judged(tmp_path, nothing_lost):
    fig = reliability.bad_input(tmp_path, n_bad=1000, n_oversize=3)
    nothing_lost(fig)
    assert fig.bad == 1000 and fig.dead_lettered == 1000
    assert fig.extra["dead_letters_not_bad"] == []  # no valid image was dead-lettered
    assert fig.extra["valid_with_error_verdict"] == 0
    assert fig.extra["worker_never_restarted"]
    cats = fig.extra["by_category"]
    assert len(cats) >= 15 and all(sent == dead for sent, dead in cats.values()), cats
    assert cats["payload over the 16 MiB limit"] == [3, 3]
    stats = fig.extra["worker_stats"]
    assert stats["dead"] == 1000 and stats["published"] == 1000
