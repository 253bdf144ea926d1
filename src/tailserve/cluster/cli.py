"""`tailserve serve --replicas N` / `--ray-address ADDR`: deploy the cluster app and serve until a signal.

With `--replicas` alone, a local Ray is started for this process (and stopped with it); with
`--ray-address`, the app is deployed onto that cluster (`ray start` on every node; the tailserve
package and the model must be installed on each node). The HTTP front is Ray Serve's proxy on
`--host:--port`, in front of our ingress. SIGTERM to this process drains the replicas and stops.
"""

from __future__ import annotations

import logging
import signal
import threading

from tailserve.cluster.config import ClusterConfig
from tailserve.config import EngineConfig, ServerConfig

log = logging.getLogger("tailserve.cluster")
APP_NAME = "tailserve"
DELETE_SLACK = 10.0  # seconds past the drain grace that deleting the app may take


def serve_cluster(cluster: ClusterConfig, engine: EngineConfig, server: ServerConfig, model_name: str) -> int:
    import ray
    from ray import serve

    from tailserve.cluster.app import build

    if cluster.ray_address is not None:
        ray.init(address=cluster.ray_address)
    else:
        ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(build(cluster, engine, server, model_name), name=APP_NAME, route_prefix="/")
        log.info(
            "serving %s on %d replica(s) at http://%s:%d",
            model_name,
            cluster.replicas or 1,
            server.host,
            server.port,
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        log.info("shutting down: replicas drain (up to %g s)", server.shutdown_grace)
        # Ray stops routing to the replicas, waits for their requests, then calls __del__. Bounded: a
        # terminal's Ctrl-C reaches Ray's own processes too, and a delete without them would hang.
        delete = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
        delete.start()
        delete.join(server.shutdown_grace + DELETE_SLACK)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
