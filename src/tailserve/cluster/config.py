"""How the Ray Serve application is shaped: replica counts, each replica's share of a node, routing,
autoscaling and back-pressure. One flag per field on `tailserve serve` (`--replicas`, `--ray-address`…)."""

from __future__ import annotations

import math
from dataclasses import dataclass

REPLICA_DEPLOYMENT = "replica"  # the replicas' deployment name within a cluster app


@dataclass
class ClusterConfig:
    replicas: int = 0  # replicas to start with (and the autoscaling floor); 0: one server, no Ray
    ray_address: str | None = None  # an existing cluster (`ray start` on every node); unset: a local one
    max_replicas: int | None = None  # autoscale up to this many; unset: a fixed number of replicas
    replica_cpus: float = 1.0  # CPUs Ray reserves for each replica (fractional is fine)
    # Threads per replica for the engine's step (--num-threads still wins); default: its CPU share.
    replica_threads: int | None = None
    # Requests in flight per replica that autoscaling aims at (Ray's target_ongoing_requests).
    target_ongoing: float = 8.0
    upscale_delay: float = 2.0  # seconds load must stay above target before a replica is added
    # Also scale up, at once, when the replicas' mean predicted TTFT of a new request passes this many
    # seconds (cluster/autoscale.py); unset: on requests in flight alone.
    scale_on_ttft: float | None = None
    downscale_delay: float = 30.0  # seconds load must stay below target before one is drained
    max_queued: int = 64  # requests waiting at the ingress when every replica is full; then 429
    load_factor: float = 1.25  # affinity's load bound: no replica above this factor of the mean
    stats_period: float = 0.5  # seconds between the replicas' routing-stats reports
    ingress_cpus: float = 0.5  # CPUs Ray reserves for the ingress
    router: str = "affinity"  # affinity (routing/'s bounded-load affinity) | ray (Ray's power of two)

    def __post_init__(self) -> None:
        if self.max_replicas is not None and self.max_replicas < max(self.replicas, 1):
            raise ValueError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        if self.router not in ("affinity", "ray"):
            raise ValueError(f"--router must be affinity or ray, not {self.router!r}")
        if self.replica_cpus <= 0:
            raise ValueError("--replica-cpus must be > 0")
        if self.scale_on_ttft is not None and (self.scale_on_ttft <= 0 or self.max_replicas is None):
            raise ValueError("--scale-on-ttft takes seconds > 0, and --max-replicas to scale up to")

    @property
    def enabled(self) -> bool:
        """Whether `tailserve serve` runs on Ray rather than as one server."""
        return self.replicas > 0 or self.ray_address is not None

    def threads(self) -> int:
        """Engine threads per replica: the flag, else its CPU share rounded up."""
        return self.replica_threads or max(1, math.ceil(self.replica_cpus))
