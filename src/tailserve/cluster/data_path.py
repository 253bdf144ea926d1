"""How requests travel inside the Ray cluster: Ray Serve's throughput-optimized data path, with the
ingress replica serving HTTP on the user's port itself (Ray's "direct ingress").

Ray Serve's default path takes every request and every streamed chunk through two actor hops (the
HTTP proxy actor, then the ingress replica) before the handle call to a replica, with user code on a
second event loop thread in each replica and a log line per request. Measured here side by side
(benchmarks/ray_serve.py, BENCHMARKS.md): TTFT p50 at c=1 +20 ms over one `tailserve serve` by
default, +11 ms with the throughput-optimized flags through the proxy, +5 ms with direct ingress.

The flags are Ray's own (`RAY_SERVE_THROUGHPUT_OPTIMIZED` and what it implies: handle calls over
gRPC between replicas, user code and router on the replica's main loop, buffered request logs,
direct ingress). Ray reads them when its modules load, in every Ray process: they go into this
process's environment before Ray starts (a local cluster's processes inherit it) and into the job's
runtime_env (the workers of an existing cluster). The proxy still runs, on a port of its own, since
Ray's HTTP ingress is off when the proxy is; nothing is routed through it.
"""

from __future__ import annotations

import os

# Ports Ray may give the ingress replica on a node, from the user's: the first that is free.
INGRESS_PORT_SPAN = 8
# Ray keeps a draining direct ingress open this long for a load balancer in front to notice; there is
# none in front (clients connect to it), and Ray's default (30 s) would hold every shutdown that long.
DRAIN_FOR_BALANCER_S = 1.0
# Ray keeps a released ingress port from every replica for 150 s by default, so an ingress replica
# that restarts (after a crash, or a redeploy) would come back on the next port and the user's address
# would answer nothing for that long. The port is free again once the old process is gone
# (uvicorn binds with SO_REUSEADDR), so it is handed back at once.
PORT_QUARANTINE_S = 0.0


def serve_env(port: int) -> dict[str, str]:
    """The environment of every Ray process of a cluster whose ingress listens on `port`."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + INGRESS_PORT_SPAN),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_FOR_BALANCER_S),
        "RAY_SERVE_PORT_QUARANTINE_S": str(PORT_QUARANTINE_S),
    }


def use(port: int) -> dict[str, str]:
    """Put `serve_env(port)` into this process's environment (before anything imports Ray Serve, which
    reads it once) and return it, for the job's runtime_env."""
    env = serve_env(port)
    os.environ.update(env)
    return env
