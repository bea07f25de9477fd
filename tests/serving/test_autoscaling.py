"""The Explainer scales with the stream's backlog through Serve's own autoscaler (worker.autoscale.backlog_policy):
a backlog of digits pushed into Redis takes it from 1 replica to 2, and it returns to 1 once the stream is
drained. Fractional CPUs let two replicas fit on a 2-core machine; short delays keep the test short."""

from __future__ import annotations

import time

import pytest
from ray import serve

from pipeline import load_sample_digits
from worker.collect import collect_verdicts, last_id
from worker.embedded import APP_NAME, embedded_stack
from worker.feed import push_images
from worker.local_redis import free_port
from worker.streams import StreamNames, connect

QUICK = {
    "Explainer": {
        "ray_actor_options": {"num_cpus": 0.25},
        "user_config": {"max_batch_size": 64, "batch_wait_timeout_s": 0.005},
        "autoscaling_config": {"policy": {"policy_function": "worker.autoscale:backlog_policy"},
                               "min_replicas": 1, "max_replicas": 2, "look_back_period_s": 1.0,
                               "upscale_delay_s": 0.5, "downscale_delay_s": 3.0},
    },
    "Denoiser": {"autoscaling_config": None, "num_replicas": 1},
    "Scorer": {"autoscaling_config": None, "num_replicas": 1},
}


def _running(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")  # read by the replicas Ray starts
        with embedded_stack(data_dir=tmp_path_factory.mktemp("autoscale"), http_port=free_port(),
                            overrides={"batch": 64, "consumers": 2, "torch_threads": 1},
                            deployment_overrides=QUICK) as st:
            yield st


def test_a_backlog_scales_the_explainer_up_and_a_drained_stream_back_down(stack):
    client, names = connect(stack.redis_url), StreamNames()
    assert _running("Explainer") == 1
    digits = load_sample_digits().images
    ids = [f"backlog-{i}" for i in range(30 * len(digits))]
    after = last_id(client, names.verdicts)
    for k in range(30):  # 60,000 digits: a backlog that outlasts a replica's start on a loaded 2-core host
        push_images(client, names, digits, ids=ids[k * len(digits) : (k + 1) * len(digits)])
    assert _wait_for(lambda: _running("Explainer") >= 2, timeout_s=120), serve.status()
    got = collect_verdicts(client, names, ids, after, timeout_s=300)
    assert len(got) == len(ids)
    assert _wait_for(lambda: _running("Explainer") == 1, timeout_s=90), serve.status()
    assert int(client.xpending(names.images, names.group)["pending"]) == 0
