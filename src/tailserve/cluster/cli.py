"""`tailserve serve --replicas N` / `--ray-address ADDR`: deploy the cluster app and serve until a signal.

With `--replicas` alone, a local Ray is started for this process (and stopped with it); with
`--ray-address`, the app is deployed onto that cluster (`ray start` on every node; the tailserve
package and the model must be installed on each node). The HTTP front is the ingress replica itself,
on this node's `--host:--port` (data_path.py). SIGTERM to this process drains the replicas and stops.
"""

from __future__ import annotations

import logging
import signal
import threading

from tailserve.cluster import data_path
from tailserve.cluster.config import ClusterConfig
from tailserve.config import EngineConfig, ServerConfig
from tailserve.gateway.spawn import free_port

log = logging.getLogger("tailserve.cluster")
APP_NAME = "tailserve"
DELETE_SLACK = 10.0  # seconds past the drain grace that deleting the app may take


def serve_cluster(cluster: ClusterConfig, engine: EngineConfig, server: ServerConfig, model_name: str) -> int:
    env = data_path.use(server.port)  # before Ray Serve is imported: it reads these once

    import ray
    from ray import serve

    from tailserve.cluster.app import build

    if cluster.ray_address is not None:
        ray.init(address=cluster.ray_address, runtime_env={"env_vars": env})
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env})
    try:
        # The proxy gets a port of its own; the ingress replica listens on --port (data_path.py).
        serve.start(http_options={"host": server.host, "port": free_port()})
        here = ray.util.get_node_ip_address()
        serve.run(build(cluster, engine, server, model_name, here), name=APP_NAME, route_prefix="/")
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
