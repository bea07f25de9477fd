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

import yaml

from worker.local_redis import LocalRedis

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve.yaml"
APP_NAME = "explainer"
INLINE_OBJECT_BYTES = 8 * 1024 * 1024  # objects up to this size travel inline between Ray processes


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """The explainer application entry of a Serve config file."""
    data = yaml.safe_load(Path(path).read_text())
    apps = [a for a in data.get("applications", []) if a.get("name") == APP_NAME] or data.get("applications", [])
    if not apps:
        raise ValueError(f"{path}: no applications in this Serve config")
    return apps[0]


def app_from_config(
    path: str | Path = DEFAULT_CONFIG, overrides: dict | None = None, local: bool = True,
    deployment_overrides: dict[str, dict] | None = None,
):
    """Build the application as ``serve run`` would from ``path``, with ``args`` overridden.

    ``local=True`` caps every stage at one replica and sizes actors for a small machine (autoscaling stays
    configured, bounded by what fits): a 2-core laptop cannot host the cluster's replica counts.
    """
    from worker.serve_app import build_app

    app = load_config(path)
    args = {**app.get("args", {}), **(overrides or {})}
    options = {}
    for dep in app.get("deployments", []):
        opts = {k: v for k, v in dep.items() if k != "name"}
        if local and "autoscaling_config" in opts:
            auto = dict(opts["autoscaling_config"])
            auto["max_replicas"] = min(auto.get("max_replicas", 1), 2)
            opts["autoscaling_config"] = auto
        options[dep["name"]] = opts
    for name, extra in (deployment_overrides or {}).items():
        merged = {**options.get(name, {}), **extra}
        options[name] = {k: v for k, v in merged.items() if v is not None}  # None removes an option
    return build_app(args, options)


@dataclass
class Stack:
    redis_url: str
    http_url: str
    redis: LocalRedis | None


def _start_serve(http_port: int, attempts: int = 2) -> None:
    """``serve.start``, retried once: under load the first proxy can miss its readiness check."""
    from ray import serve

    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
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
    deployment_overrides: dict[str, dict] | None = None,
) -> Iterator[Stack]:
    """Start (local redis) + Ray + the Serve app; tear all of it down on exit, gracefully."""
    import ray
    from ray import serve

    local = None
    if redis_url is None:
        local = LocalRedis(Path(data_dir) / "redis").start()
        redis_url = local.url
    # a loaded 2-core machine starts processes slowly: give Serve's proxy time to come up rather than kill it;
    # and the controller's default 0.1 s loop is a noticeable share of a core at idle: 0.5 s is ample for one machine
    for var, seconds in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
                         ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30"),
                         ("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")):
        os.environ.setdefault(var, seconds)
    started_ray = not ray.is_initialized()
    try:
        if started_ray:
            # on one machine a batch passes stage to stage faster inline (gRPC) than through the shared-memory
            # object store, whose every put and get is a round trip to the raylet; a batch of digits is above
            # Ray's 100 KB default. It reaches every process of the Ray this starts, and no other.
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=True,
                     _system_config={"max_direct_call_object_size": INLINE_OBJECT_BYTES})
        _start_serve(http_port)
        app = app_from_config(config, {**(overrides or {}), "redis_url": redis_url},
                              deployment_overrides=deployment_overrides)
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield Stack(redis_url, f"http://127.0.0.1:{http_port}", local)
    finally:
        try:
            try:  # finish the batches in flight while every stage is still up, then delete the app
                left = serve.get_app_handle(APP_NAME).drain.remote().result(timeout_s=60)
                if left:
                    logging.getLogger("explainer").warning("%d consumer threads did not stop in time", left)
            except Exception as exc:  # noqa: BLE001 - the app may have failed to start; deletion still runs
                logging.getLogger("explainer").warning("could not drain the consumers: %s", exc)
            serve.delete(APP_NAME)
            deadline = time.monotonic() + 30
            while APP_NAME in serve.status().applications and time.monotonic() < deadline:
                time.sleep(0.2)
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
            if local is not None:
                local.stop()
