"""The Ray Serve application: the replica deployment (one AsyncEngine each, our router, autoscaling,
draining) bound under the ingress deployment.

Autoscaling uses Ray Serve's own policy on ongoing requests per replica (`target_ongoing`): requests
in flight are what fills a replica's running slots and queue, Ray measures them at every handle with
no extra reporting, and its policy has the up/down delays that keep a burst from flapping replicas.
With `scale_on_ttft`, cluster/autoscale.py's policy also scales up at once when the replicas' predicted
TTFT passes it (a burst of long prompts fills the queue in time before it does in count). Scale-down
drains: Ray stops routing to the replica, waits for its requests (up to `shutdown_grace`), then calls
its `__del__`, which drains what is left as `tailserve serve` does on SIGTERM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, BackpressureConfig, RequestRouterConfig

from tailserve.cluster.autoscale import PredictedTtftPolicy
from tailserve.cluster.config import REPLICA_DEPLOYMENT, ClusterConfig
from tailserve.cluster.ingress import Ingress
from tailserve.cluster.replica import EngineReplica
from tailserve.cluster.router import AffinityRouter
from tailserve.config import EngineConfig, ServerConfig


def replica_options(cluster: ClusterConfig, engine: EngineConfig, server: ServerConfig) -> dict[str, Any]:
    """`serve.deployment` options of the replicas."""
    opts: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        # A replica takes what its engine can run or queue; beyond that Ray tries the next replica.
        "max_ongoing_requests": engine.max_num_seqs + server.max_queue,
        "max_queued_requests": cluster.max_queued,
        # Past that cap the caller gets 429 + Retry-After, as from one full server (Ray's default: 503).
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "ray_actor_options": {"num_cpus": cluster.replica_cpus},
        "request_router_config": RequestRouterConfig(
            request_router_kwargs={"load_factor": cluster.load_factor},
            request_routing_stats_period_s=cluster.stats_period,
            request_routing_stats_timeout_s=max(1.0, 4 * cluster.stats_period),
            **({"request_router_class": AffinityRouter} if cluster.router == "affinity" else {}),
        ),
        "graceful_shutdown_timeout_s": server.shutdown_grace,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
    }
    if cluster.max_replicas is None or cluster.max_replicas == cluster.replicas:
        opts["num_replicas"] = max(cluster.replicas, 1)
    else:
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=max(cluster.replicas, 1),
            max_replicas=cluster.max_replicas,
            target_ongoing_requests=cluster.target_ongoing,
            upscale_delay_s=cluster.upscale_delay,
            downscale_delay_s=cluster.downscale_delay,
            metrics_interval_s=0.5,
            look_back_period_s=2.0,
            **({"policy": ttft_policy(cluster.scale_on_ttft)} if cluster.scale_on_ttft else {}),
        )
    return opts


def ttft_policy(target_ttft_s: float) -> AutoscalingPolicy:
    """Ray's policy raised by the replicas' predicted TTFT (cluster/autoscale.py)."""
    return AutoscalingPolicy(
        policy_function=PredictedTtftPolicy, policy_kwargs={"target_ttft_s": target_ttft_s}
    )


def build(
    cluster: ClusterConfig,
    engine: EngineConfig,
    server: ServerConfig,
    model_name: str,
    ingress_node: str | None = None,
) -> serve.Application:
    """The application: `serve.run(build(...))` deploys it. `ingress_node` (an IP) pins the ingress to
    that node, where it serves HTTP itself (data_path.py): the address the user was given."""
    engine = dataclasses.replace(engine, num_threads=engine.num_threads or cluster.threads())
    replica = serve.deployment(EngineReplica).options(**replica_options(cluster, engine, server))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="ingress",
        ray_actor_options={
            "num_cpus": cluster.ingress_cpus,
            **({"resources": {f"node:{ingress_node}": 0.001}} if ingress_node else {}),
        },
        max_ongoing_requests=10_000,  # the replicas and their queue cap decide what waits, not the ingress
    )
    return ingress.bind(replica.bind(engine, server, model_name), server)
