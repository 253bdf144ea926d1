"""A replica: one AsyncEngine and the single server's whole request path (server.app.build_app), run in
a Ray Serve replica actor.

Why the request path runs here and not at the ingress: admission, deadlines and the engine's own
input checks read this engine's exact counters (in-flight, queued prompt tokens, the measured prefill
rate); an ingress deciding on a snapshot one report old would admit into a full replica. The ingress
only routes; the replica answers exactly as `tailserve serve` does, status codes and all.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from tailserve.cluster.asgi import Start, play
from tailserve.cluster.autoscale import TTFT_METRIC
from tailserve.config import EngineConfig, ServerConfig
from tailserve.obs.observer import log_requests_to_stderr
from tailserve.obs.startup import StartupTimer
from tailserve.server.loading import start_serving
from tailserve.server.shutdown import drain

log = logging.getLogger("tailserve.cluster")


def routing_stats(server: Any) -> dict[str, float | None]:
    """What the router reads of a replica (its `OpenAIServer`): requests in flight and waiting, KV use,
    and the predicted time to the first token of a new request of 256 prompt tokens."""
    adm, stats = server.admission, server.engine.stats
    pred = adm.predict(stats, 256)
    return {
        "in_flight": adm.in_flight,
        "waiting": adm.queued_requests(stats),
        "kv_usage": stats.kv_cache_usage,
        "ttft": None if pred is None else pred[1],
    }


class EngineReplica:
    """The user class of the replica deployment (wrapped by `serve.deployment` in cluster.app)."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, model_name: str) -> None:
        from ray import serve

        # The replica's own part of its start (the process start is Ray's), phase by phase as
        # `tailserve serve` times it, and exported the same way (`tailserve:startup_*`).
        timer = StartupTimer(started=time.perf_counter())
        if server_config.request_log:
            # The process's own stderr (Ray writes it to the worker's .err file and shows it on the
            # driver's console), not `sys.stderr`: Ray Serve's throughput-optimized mode swaps that for
            # its logger, which walks the stack on every line and buffers 1,000 records before writing.
            log_requests_to_stderr(sys.__stderr__)
        self.name = serve.get_replica_context().replica_id.unique_id
        self.grace = server_config.shutdown_grace
        self.engine, self.app = start_serving(engine_config, server_config, model_name, timer)
        self.server = self.app.state.server
        self.init_s = timer.ready_seconds or 0.0
        log.info("replica %s serving %s: %s", self.name, model_name, timer.summary())

    async def forward(
        self, scope: dict[str, Any], body: bytes, key: str | None = None
    ) -> AsyncIterator[Start | bytes]:
        """One HTTP request through this replica's app: its Start, then its body. `key` (the affinity
        key) is for the router."""
        async for item in play(self.app, scope, body):
            if isinstance(item, Start):
                item.headers.append((b"x-tailserve-replica", self.name.encode()))
            yield item

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this every `metrics_interval_s`; cluster/autoscale.py's policy reads it."""
        return {TTFT_METRIC: routing_stats(self.server)["ttft"] or 0.0}

    def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve calls this every `request_routing_stats_period_s`; the router reads the result."""
        return {"replica": self.name, **routing_stats(self.server)}

    async def metrics(self, pin: str | None = None) -> tuple[str, bytes]:
        """(this replica's name, its Prometheus exposition). `pin` routes the call to one replica."""
        m = self.server.obs.metrics
        return self.name, (m.render() if m is not None else b"")

    def state(self, pin: str | None = None) -> dict[str, Any]:
        """Engine and admission figures, for tests and benchmarks (`pin` as for `metrics`)."""
        import ray

        engine = self.engine.engine
        s = engine.stats
        return {
            "replica": self.name,
            "init_s": self.init_s,
            "node": ray.get_runtime_context().get_node_id(),
            "requests": len(engine.requests),
            "free_blocks": engine.block_manager.num_free_blocks,
            "total_blocks": engine.block_manager.num_blocks,
            "prefix_queries": s.prefix_cache_queries,
            "prefix_hits": s.prefix_cache_hits,
            **routing_stats(self.server),
        }

    def check_health(self) -> None:
        """Ray Serve's health check: a dead engine thread makes Ray replace this replica."""
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    async def __del__(self) -> None:
        # Ray has already waited for this replica's requests (graceful_shutdown_timeout_s): what is left
        # is drained as `tailserve serve` drains on SIGTERM, then the engine stops.
        with contextlib.suppress(Exception):
            await drain(self.app, self.grace)
        self.engine.shutdown()
        self.server.obs.close()
