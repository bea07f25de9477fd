"""Autoscaling of the model-bound stage on the work waiting in Redis, as a Ray Serve custom autoscaling policy.

Serve's default policy scales a deployment on the requests its handles hold, and a stream worker only ever holds
as many as it has batches in flight: a backlog of a million images in Redis looks like a few requests. The
Explainer's replicas report the stream's backlog (entries waiting plus entries in flight) and how many images one
replica takes at once (``record_autoscaling_stats``); :func:`backlog_policy` asks for enough replicas to take the
backlog at once, and never fewer than the default policy would. Serve applies the deployment's ``min_replicas``,
``max_replicas`` and up/down-scale delays to the answer.

    autoscaling_config:
      policy: {policy_function: worker.autoscale:backlog_policy}
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext


def backlog_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas for the stream's backlog: ceil(backlog / images one replica takes at once), or what Serve's
    queue-length policy asks for if that is more."""
    by_queue, state = replica_queue_length_autoscaling_policy(ctx)
    metrics = ctx.aggregated_metrics or {}
    backlog = max(metrics.get("stream_backlog", {}).values(), default=0.0)  # every replica sees the same stream
    capacity = max(metrics.get("replica_capacity", {}).values(), default=0.0)
    by_backlog = math.ceil(backlog / capacity) if capacity > 0 else 0
    return max(by_queue, by_backlog), state
