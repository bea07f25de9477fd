"""The Serve configs as Ray reads them: deploy/serve.yaml and deploy/rayservice.yaml validate against Serve's own
schema, point at the same builder, and their args validate against the builder's typed arguments through the
function Serve's controller calls; a misspelt key or a password in the YAML is refused with a message that says
so. (tests/serving/test_serve.py deploys deploy/serve.yaml through Serve's config path against a real Redis.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from worker.embedded import DEFAULT_CONFIG, app_config
from worker.serve_app import AppArgs, build_app
from worker.streams import redis_password

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _schema(path: Path) -> ServeDeploySchema:
    data = yaml.safe_load(path.read_text())
    if data.get("kind") == "RayService":
        data = yaml.safe_load(data["spec"]["serveConfigV2"])
    return ServeDeploySchema.model_validate(data)


def test_the_shipped_config_is_the_one_deploy_points_at():
    assert (DEPLOY / "serve.yaml").resolve() == DEFAULT_CONFIG.resolve()


def test_serve_yaml_and_the_rayservice_use_one_builder_with_valid_args():
    local, cluster = _schema(DEPLOY / "serve.yaml"), _schema(DEPLOY / "rayservice.yaml")
    (app,), (kube,) = local.applications, cluster.applications
    assert app.import_path == kube.import_path == "worker.serve_app:build_app"
    assert {d.name for d in app.deployments} == {d.name for d in kube.deployments} == {
        "Ingress", "Denoiser", "Explainer", "Scorer"}
    for args in (app.args, kube.args):
        built = call_user_app_builder_with_args_if_necessary(build_app, args)  # what Serve's controller runs
        assert type(built).__name__ == "Application"


def test_a_misspelt_or_unknown_arg_is_an_error_naming_it():
    with pytest.raises(ValidationError, match="modle"):
        call_user_app_builder_with_args_if_necessary(build_app, {"modle": "mnist"})
    with pytest.raises(ValidationError, match="consumers"):
        AppArgs.model_validate({"consumers": 0})


def test_a_password_in_the_yaml_is_refused_and_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="password never goes in the config"):
        AppArgs.model_validate({"redis_url": "redis://:hunter2@127.0.0.1:6379/0"})
    monkeypatch.delenv("EXPLAINER_REDIS_PASSWORD", raising=False)
    assert redis_password(None) is None
    monkeypatch.setenv("EXPLAINER_REDIS_PASSWORD", "from-env")
    assert redis_password(None) == "from-env"
    secret = tmp_path / "password"
    secret.write_text("from/file#1\n")
    assert redis_password(str(secret)) == "from/file#1"
    from worker.streams import redact_url

    assert redact_url("redis://:p%2Fw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://worker:secret@h/0?password=x&ssl_ca_certs=/c.pem") == \
        "rediss://worker:***@h/0?password=***&ssl_ca_certs=/c.pem"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_local_overrides_keep_the_config_valid_for_serve():
    app = app_config(overrides={"redis_url": "redis://127.0.0.1:1/0", "batch": 8},
                     deployment_overrides={"Explainer": {"user_config": {"max_batch_size": 8}}})
    schema = ServeDeploySchema.model_validate({"applications": [app]})
    explainer = next(d for d in schema.applications[0].deployments if d.name == "Explainer")
    assert explainer.user_config == {"max_batch_size": 8}
    assert explainer.autoscaling_config["max_replicas"] <= 2  # a laptop's cap
    AppArgs.model_validate(schema.applications[0].args)


def test_the_grafana_dashboard_queries_only_metrics_the_ingress_exports():
    import json
    import re

    from worker import serve_app

    source = Path(serve_app.__file__).read_text()
    exported = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(explainer_\w+)"', source))
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queried = {m for p in dashboard["panels"] for t in p["targets"]
               for m in re.findall(r"ray_(explainer_\w+?)(?:_total|_bucket|_count|_sum)?\b", t["expr"])}
    assert queried and queried <= exported, queried - exported
    assert exported <= queried, f"exported but not on the dashboard: {exported - queried}"


@pytest.mark.parametrize("config", ["serve.yaml", "rayservice.yaml"])
def test_the_ingress_can_feed_every_explainer_the_backlog_policy_may_start(config):
    (app,) = _schema(DEPLOY / config).applications
    deployments = {d.name: d for d in app.deployments}
    ingress_replicas = deployments["Ingress"].num_replicas or 1
    explainer = deployments["Explainer"].autoscaling_config
    assert explainer["policy"]["policy_function"] == "worker.autoscale:backlog_policy"
    args = AppArgs.model_validate(app.args)
    assert args.consumers * args.shards * ingress_replicas >= explainer["max_replicas"]


def test_detectors_are_named_one_way_and_a_served_one_must_be_calibrated(tmp_path):
    with pytest.raises(ValidationError, match="either detector"):
        AppArgs.model_validate({"detector": "mnist", "model": "mnist"})
    assert AppArgs.model_validate({"detector": ["mnist", "/models/cams"]}).detector_refs() == [
        {"model": "mnist"}, {"bundle": "/models/cams", "digest": None, "trust_code": False}]
    pin = "sha256:" + "ab" * 32
    assert AppArgs.model_validate({"detector": [f"/models/cams@{pin}"], "trust_code": True}).detector_refs() == [
        {"bundle": "/models/cams", "digest": pin, "trust_code": True}]
    assert AppArgs.model_validate({"model": "mobilenet_v2"}).detector_refs() == [
        {"model": "mobilenet_v2", "weights": None, "calibration": None}]
    # an override naming the detectors one way drops the config's other way
    assert "detector" not in app_config(overrides={"model": "mobilenet_v2"})["args"]
    assert "model" not in app_config(overrides={"detector": ["mnist"]})["args"]

    import torch

    from pipeline import Detector
    from worker.detect import load_served_detectors

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    Detector.from_model(torch.jit.script(net), input_size=28, channels=1, name="raw").save(tmp_path / "raw")
    with pytest.raises(ValueError, match="'raw' has no calibration.*explainer calibrate"):
        load_served_detectors([{"bundle": str(tmp_path / "raw"), "trust_code": True}])
    with pytest.raises(ValueError, match="two served detectors are named 'mnist'"):
        load_served_detectors([{"model": "mnist"}, {"model": "mnist"}])


def test_the_explainer_splits_a_merged_batch_by_model_and_keeps_each_requests_rows():
    """Serve merges concurrent requests whatever detector they name: one Captum call per model, and each request
    gets back exactly what its own detector gives its own images."""
    import numpy as np
    import torch

    from pipeline import Detector, load_sample_digits
    from worker.serve_app import Explainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 26 * 26, 10))
    detectors = {"mnist": Detector.from_pretrained("mnist"),
                 "other": Detector.from_model(net, input_size=28, channels=1, name="other")}
    explainer = Explainer.func_or_class.__new__(Explainer.func_or_class)  # the class itself, no replica
    explainer._init_stats()
    explainer.detectors = detectors
    from pipeline import MemoryCeiling

    explainer._memory = MemoryCeiling()  # not started: never trims
    images = load_sample_digits().images
    det = detectors["mnist"]
    requests = [det.prepare(images[a:b], as_pixels=True) for a, b in ((0, 3), (3, 8), (8, 9), (9, 13))]
    denoised = [det.denoise(x) for x in requests]
    models = ["mnist", "other", "mnist", "other"]
    out = explainer._explain_merged(requests, denoised, models)
    for x, d, model, got in zip(requests, denoised, models, out, strict=True):
        alone = detectors[model].explain_pair(x, d)
        assert np.allclose(got.probs, alone.probs, atol=1e-6) and np.allclose(got.maps, alone.maps, atol=1e-6)

    # a call that never returns (a model hanging on some input) is abandoned: its requests fail with a timeout,
    # the replica keeps serving on a fresh thread, and enough stuck calls fail its health check
    import asyncio
    import threading
    import time

    from worker.calls import AbandonableThreads
    from worker.serve_app import MAX_ABANDONED_CALLS

    release = threading.Event()

    class Hung:
        def explain_pair(self, x, d):
            release.wait()
            return detectors["other"].explain_pair(x, d)

    explainer.detectors = {**detectors, "hung": Hung()}
    explainer._pool, explainer.stage_timeout_s = AbandonableThreads(2, name="test"), 0.5
    explainer.check_health()

    async def one(x, d, model):
        return (await explainer._run_merged([x], [d], [model]))[0]

    async def calls():
        hung = asyncio.ensure_future(one(requests[0], denoised[0], "hung"))
        await asyncio.sleep(0.05)  # the hung call first, alone in its batch
        fine = await asyncio.gather(one(requests[1], denoised[1], "mnist"), one(requests[2], denoised[2], "mnist"))
        with pytest.raises(TimeoutError, match="did not return"):
            await hung
        return fine, await one(requests[3], denoised[3], "other")  # after the abandonment: a fresh thread

    fine, after = asyncio.run(calls())
    assert np.allclose(fine[0].probs, detectors["mnist"].explain_pair(requests[1], denoised[1]).probs, atol=1e-6)
    assert np.allclose(after.probs, detectors["other"].explain_pair(requests[3], denoised[3]).probs, atol=1e-6)
    assert explainer._pool.abandoned == 1
    explainer.check_health()  # one stuck call costs a thread, not the replica
    for _ in range(MAX_ABANDONED_CALLS - 1):
        with pytest.raises(TimeoutError):
            asyncio.run(one(requests[0], denoised[0], "hung"))
    with pytest.raises(RuntimeError, match="abandoned and still running"):
        explainer.check_health()
    release.set()  # the stuck calls return: their threads end, the replica is healthy again
    for _ in range(100):
        if explainer._pool.abandoned == 0:
            break
        time.sleep(0.05)
    explainer.check_health()


def test_a_deployment_decides_at_the_operating_point_it_names_and_refuses_one_its_calibration_lacks():
    from pipeline import load_sample_digits
    from worker.detect import detect_requests, load_served_detectors
    from worker.wire import Request

    args = AppArgs(detector=["mnist"], fpr=0.01)
    assert args.detector_refs() == [{"model": "mnist", "fpr": 0.01}]
    served = load_served_detectors(args.detector_refs())
    image = load_sample_digits().images[0]
    (verdict,) = detect_requests(served, [Request(id="a", image=image, model="mnist")])
    assert verdict["fpr"] == 0.01 and verdict["threshold"] == served["mnist"].calibration.point(0.01).threshold
    with pytest.raises(ValueError, match=r"detector 'mnist': .*holds thresholds for FPR 5%, 1%, 0\.1%, not 2%"):
        load_served_detectors(AppArgs(detector=["mnist"], fpr=0.02).detector_refs())
    with pytest.raises(ValidationError):
        AppArgs(fpr=1.5)


def test_every_entry_point_takes_the_stream_knobs_from_one_settings_type():
    """One name, one default and one check per knob: StreamSettings. The Serve args, the standalone worker's options
    and a consumer built with no settings all agree with it."""
    import dataclasses

    from worker.standalone import parse_args
    from worker.streams import StreamConsumer, StreamSettings, connect

    knobs = StreamSettings.knobs()
    assert AppArgs().stream_settings() == StreamSettings()
    assert {name: default for name, (default, _) in knobs.items()} == dataclasses.asdict(StreamSettings())
    standalone = parse_args([])
    assert {name: getattr(standalone, name) for name in knobs} == dataclasses.asdict(StreamSettings())
    assert StreamConsumer(connect("redis://127.0.0.1:1/0")).settings == StreamSettings()
    for bad in ({"batch": 0}, {"max_deliveries": 0}, {"block_ms": -1}, {"verdict_maxlen": "many"}):
        with pytest.raises(ValueError, match=f"stream setting {next(iter(bad))}"):
            StreamSettings(**bad)
        with pytest.raises(ValidationError, match=next(iter(bad))):
            AppArgs.model_validate(bad)
    assert AppArgs.model_validate({"batch": 256}).stream_settings().given() == {"batch": 256}


def test_the_stages_that_never_run_the_model_load_no_network(monkeypatch):
    """The Denoiser needs each detector's NLM parameters and the Scorer its config and calibration: they load
    those alone (worker.detect.load_served_deciders), never a network, and agree with what the Explainer loads."""
    from pathlib import Path

    import pipeline
    import pipeline.bundle
    import pipeline.detector
    from worker.detect import load_served_deciders, load_served_detectors

    refs = [{"model": "mnist", "fpr": 0.01},
            {"bundle": str(Path(pipeline.__file__).parent / "assets" / "detectors" / "mobilenet_v2"), "digest": None}]
    full = load_served_detectors(refs[:1])

    def no_network(*_, **__):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr(pipeline.bundle, "load_model", no_network)
    monkeypatch.setattr(pipeline.detector, "load_model", no_network)
    deciders = load_served_deciders(refs)
    assert set(deciders) == {"mnist", "mobilenet_v2"} and deciders["mnist"].fpr == 0.01
    assert deciders["mnist"].config == full["mnist"].config
    assert deciders["mnist"].calibration == full["mnist"].calibration
