"""Run the whole stack on one machine with no setup: a local redis-server (AOF on), a local Ray, the Serve app.

``explainer serve`` and ``explainer demo`` use :func:`embedded_stack`; with a ``redis_url`` it uses that Redis
instead of starting one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import yaml

from worker.local_redis import LocalRedis, free_port, note_local_url

DEFAULT_CONFIG = Path(__file__).resolve().parent / "serve.yaml"  # deploy/serve.yaml links to it
APP_NAME = "explainer"
INLINE_OBJECT_BYTES = 8 * 1024 * 1024  # objects up to this size travel inline between Ray processes
METRICS_INTERVAL_MS = 5000  # how often Ray's processes report their metrics to the node's endpoint
DETECTOR_ARGS, MODEL_ARGS = {"detector"}, {"model", "weights", "calibration"}  # AppArgs: one or the other


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """The explainer application entry of a Serve config file."""
    data = yaml.safe_load(Path(path).read_text())
    apps = [a for a in data.get("applications", []) if a.get("name") == APP_NAME] or data.get("applications", [])
    if not apps:
        raise ValueError(f"{path}: no applications in this Serve config")
    return apps[0]


def app_config(
    path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None, local: bool = True,
    deployment_overrides: dict[str, dict] | None = None,
) -> dict:
    """The explainer application's entry of the Serve config ``path``, as ``serve run`` reads it, with ``args``
    overridden and per-deployment options merged (an option set to None is removed).

    ``local=True`` caps every autoscaling stage at two replicas: a 2-core laptop cannot host the cluster's
    replica counts."""
    app = dict(load_config(path))
    args = dict(app.get("args", {}))
    given = set(overrides or {})
    # the overrides name the detectors one way (bundles/names, or a built-in model with its files): the config's
    # other way goes
    for way, other in ((DETECTOR_ARGS, MODEL_ARGS), (MODEL_ARGS, DETECTOR_ARGS)):
        if given & way:
            args = {k: v for k, v in args.items() if k not in other}
    app["args"] = {**args, **(overrides or {})}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    for opts in options.values():
        if local and "autoscaling_config" in opts:
            opts["autoscaling_config"] = {**opts["autoscaling_config"],
                                          "max_replicas": min(opts["autoscaling_config"].get("max_replicas", 1), 2)}
    for name, extra in (deployment_overrides or {}).items():
        merged = {**options.get(name, {}), **extra}
        options[name] = {k: v for k, v in merged.items() if v is not None}
    app["deployments"] = [{"name": name, **opts} for name, opts in options.items()]
    return app


def deploy(app: dict, timeout_s: float = 600.0) -> None:
    """Deploy ``app`` (a config file's application entry) through Serve's own config path, the one ``serve run
    config.yaml`` and ``serve deploy`` take: the schema validates it, the controller imports the builder and
    validates its args (:class:`worker.serve_app.AppArgs`). Waits until it runs; a failed deployment raises
    with Serve's message. As with ``serve deploy``, the config is the whole of Serve's declared state: other
    applications deployed from a config are removed."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate({"applications": [app]})
    _get_global_client().deploy_apps(schema)
    name, deadline = schema.applications[0].name, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            why = "; ".join(f"{d}: {s.message}" for d, s in status.deployments.items() if s.message)
            raise RuntimeError(f"deploying application {name} failed: {status.message} {why}".strip())
        time.sleep(0.5)
    raise TimeoutError(f"application {name} is not running after {timeout_s:.0f} s")


def _password_to_file(redis_url: str, data_dir: Path) -> tuple[str, str | None]:
    """A URL's password moved into a file only this user can read, so that it never enters the Serve config:
    (the URL without it, the file's path) or (the URL, None) when it has none."""
    parts = urlsplit(redis_url)
    query = parse_qs(parts.query, keep_blank_values=True)
    from_query = query.pop("password", [None])[0]
    password = unquote(parts.password) if parts.password else from_query
    if not password:
        return redis_url, None
    data_dir = Path(data_dir).resolve()  # the replicas do not share the driver's working directory
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = data_dir / "redis.password"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(password)
    host = parts.hostname or "127.0.0.1"
    netloc = (f"{parts.username}@" if parts.username else "") + (f"[{host}]" if ":" in host else host)
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True), parts.fragment)), str(secret)


@dataclass
class Stack:
    redis_url: str
    http_url: str
    redis: LocalRedis | None
    metrics_url: str | None = None  # Ray's Prometheus endpoint of this node (when this stack started Ray)


def _start_serve(http_port: int, http_host: str = "127.0.0.1", attempts: int = 2) -> None:
    """``serve.start``, retried once: under load the first proxy can miss its readiness check."""
    from ray import serve

    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": http_host, "port": http_port})
            return
        except Exception:  # noqa: BLE001 - Ray raises several types here; the last attempt re-raises
            if attempt == attempts - 1:
                raise
            logging.getLogger("explainer").warning("Serve did not start; retrying once")
            serve.shutdown()


@contextmanager
def embedded_stack(
    redis_url: str | None = None, config: str | Path = DEFAULT_CONFIG, data_dir: str | Path = ".explainer",
    http_port: int = 8000, overrides: dict | None = None, num_cpus: int | None = None,
    deployment_overrides: dict[str, dict] | None = None, metrics_port: int | None = None,
    http_host: str = "127.0.0.1",
) -> Iterator[Stack]:
    """Start (local redis) + Ray + the Serve app; tear all of it down on exit, gracefully. When it starts Ray,
    Ray serves the metrics in Prometheus format on ``metrics_port`` (default: a free port)."""
    import ray
    from ray import serve

    local, password_file = None, None
    if redis_url is None:
        local = LocalRedis(Path(data_dir) / "redis").start()
        redis_url = local.url
        noted = note_local_url(redis_url, data_dir)
    # a loaded 2-core machine starts processes slowly: give Serve's proxy time to come up rather than kill it;
    # and the controller's default 0.1 s loop is a noticeable share of a core at idle: 0.5 s is ample for one machine
    for var, seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
                         ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30"),
                         ("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")):
        os.environ.setdefault(var, seconds)
    started_ray, deployed = not ray.is_initialized(), False
    try:
        if started_ray:
            # on one machine a batch passes stage to stage faster inline (gRPC) than through the shared-memory
            # object store, whose every put and get is a round trip to the raylet; a batch of digits is above
            # Ray's 100 KB default. It reaches every process of the Ray this starts, and no other.
            metrics_port = metrics_port or free_port()
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=True, _metrics_export_port=metrics_port,
                     _system_config={"max_direct_call_object_size": INLINE_OBJECT_BYTES,
                                     "metrics_report_interval_ms": METRICS_INTERVAL_MS})
        _start_serve(http_port, http_host)
        url, password_file = _password_to_file(redis_url, Path(data_dir))
        args = {**(overrides or {}), "redis_url": url}
        if password_file:
            args["redis_password_file"] = password_file
        deploy(app_config(config, args, deployment_overrides=deployment_overrides))
        deployed = True
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if started_ray else None
        shown_host = "127.0.0.1" if http_host in ("0.0.0.0", "::") else http_host
        yield Stack(redis_url, f"http://{shown_host}:{http_port}", local, metrics_url)
    finally:
        try:
            try:  # finish the batches in flight while every stage is still up, then delete the app
                left = serve.get_app_handle(APP_NAME).drain.remote().result(timeout_s=60) if deployed else 0
                if left:
                    logging.getLogger("explainer").warning("%d consumer threads did not stop in time", left)
            except Exception as exc:  # noqa: BLE001 - a stage may have died; deletion still runs
                logging.getLogger("explainer").warning("could not drain the consumers: %s", exc)
            serve.delete(APP_NAME)
            deadline = time.monotonic() + 30
            while APP_NAME in serve.status().applications and time.monotonic() < deadline:
                time.sleep(0.2)
            serve.shutdown()
        finally:
            try:
                if started_ray:
                    ray.shutdown()
                if local is not None:
                    local.stop()
            finally:
                if local is not None:
                    noted.unlink(missing_ok=True)
                if password_file:
                    Path(password_file).unlink(missing_ok=True)
