"""The Serve app on a multi-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``): a node with
a ``gpu_node`` resource stands in for a GPU node and one with ``cpu_node`` for the CPU pool, as
deploy/rayservice.yaml labels its worker groups. The Explainer lands only on the "GPU" node, the CPU stages only
elsewhere, and verdicts flow end to end. On a real cluster the Explainer asks for ``num_gpus: 1`` instead of the
stand-in resource (deploy/rayservice.yaml)."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.serve.context import _get_global_client

from pipeline import Detector, load_sample_digits
from worker.collect import round_trip
from worker.embedded import APP_NAME, embedded_stack
from worker.local_redis import free_port
from worker.streams import StreamNames, connect

CPU_STAGES = ("Ingress", "Denoiser", "Scorer")
PLACEMENT = {
    "Explainer": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"gpu_node": 0.01}},
                  "autoscaling_config": None, "num_replicas": 1},
    **{name: {"ray_actor_options": {"num_cpus": 0.1, "resources": {"cpu_node": 0.01}}, "autoscaling_config": None,
              "num_replicas": 1} for name in CPU_STAGES},
}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu = cluster.add_node(num_cpus=1, resources={"gpu_node": 1})
    cpu = cluster.add_node(num_cpus=1, resources={"cpu_node": 1})
    ray.init(address=cluster.address)
    try:
        yield {"head": cluster.head_node.node_id, "gpu": gpu.node_id, "cpu": cpu.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_model_stage_lands_on_the_gpu_node_and_verdicts_flow(cluster, tmp_path):
    with embedded_stack(data_dir=tmp_path / "stack", http_port=free_port(), overrides={"batch": 32, "consumers": 1},
                        deployment_overrides=PLACEMENT) as stack:
        details = _get_global_client().get_serve_details()
        deployments = details["applications"][APP_NAME]["deployments"]
        nodes = {name: {r["node_id"] for r in d["replicas"]} for name, d in deployments.items()}
        assert nodes["Explainer"] == {cluster["gpu"]}, nodes
        for name in CPU_STAGES:
            assert nodes[name] == {cluster["cpu"]}, nodes
        client, names = connect(stack.redis_url), StreamNames()
        digits = load_sample_digits().images[:64]
        ids, got = round_trip(client, names, digits, "cluster", timeout_s=180)
        expected = Detector.from_pretrained("mnist").detect(digits)
        assert [got[i]["is_adversarial"] for i in ids] == expected.is_adversarial.tolist()
        assert int(client.xpending(names.images, names.group)["pending"]) == 0
