"""One Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`), shared by every cluster
test, with the tiny random-weight model served on it as the `tailserve serve --replicas` app."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from tailserve.cluster import data_path  # noqa: E402
from tailserve.cluster.app import build  # noqa: E402
from tailserve.cluster.config import REPLICA_DEPLOYMENT, ClusterConfig  # noqa: E402
from tailserve.config import EngineConfig, ServerConfig  # noqa: E402
from tests.tiny_weights import write_hf_folder  # noqa: E402

MODEL = "tiny"
APP = "tailtest"
SRC = str(Path(__file__).resolve().parents[2] / "src")


@dataclass
class LiveCluster:
    url: str
    ingress: Any  # the app's handle: replica_states() for tests
    deploy: Any  # ClusterConfig → the app deployed anew in place with that shape (returns its handle)
    shape: ClusterConfig  # the shape it was deployed with

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def states(self) -> list[dict[str, Any]]:
        return self.ingress.replica_states.remote().result(timeout_s=30)

    def running_replicas(self) -> int:
        status = serve.status().applications[APP].deployments[REPLICA_DEPLOYMENT]
        return status.replica_states.get("RUNNING", 0)

    def wait_replicas(self, n: int, timeout: float) -> float:
        """Seconds until exactly `n` replicas run (AssertionError after `timeout`)."""
        t0 = time.monotonic()
        while self.running_replicas() != n:
            assert time.monotonic() - t0 < timeout, f"{self.running_replicas()} replicas, not {n}"
            time.sleep(0.2)
        return time.monotonic() - t0


def sustained_burst(
    url: str,
    body: dict,
    workers: int,
    until: Callable[[], float],
    check: Callable[[Any], None] = lambda r: None,
) -> tuple[float, Counter[int]]:
    """`workers` clients posting `body` to `url` back to back (0.2 s apart after an answer other than
    200, each answer passed to `check`) until `until()` returns: its result, and the statuses seen."""
    import httpx

    statuses: Counter[int] = Counter()

    async def worker(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            r = await client.post(url, json=body)
            statuses[r.status_code] += 1
            check(r)
            if r.status_code != 200:
                await asyncio.sleep(0.2)

    async def main() -> float:
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            tasks = [asyncio.create_task(worker(client, stop)) for _ in range(workers)]
            try:
                return await asyncio.to_thread(until)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

    return asyncio.run(main()), statuses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Package scope: the cluster (two raylets, a controller, a proxy, replicas) stops once this folder's
# tests are done, instead of idling beside the rest of the suite.
@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    folder = write_hf_folder(tmp_path_factory.mktemp("cluster") / "tiny")
    port = _free_port()
    saved = dict(os.environ)
    path_env = data_path.use(port)  # the nodes' processes inherit it, as `tailserve serve`'s do
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=2)
    env = {
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        # the tiny model runs PyTorch ops: no wait on a kernels build another process holds
        "TAILSERVE_DISABLE_KERNELS": "1",
        **path_env,
    }
    ray.init(address=nodes.address, runtime_env={"env_vars": env})
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": _free_port()})
        engine = EngineConfig(
            model=str(folder),
            dtype="float32",
            fused=False,
            kv_cache_memory=0.01,
            block_size=4,
            max_num_seqs=4,
            weight_cache=False,
        )
        server = ServerConfig(request_log=True, max_queue=8, shutdown_grace=5.0)
        shape = ClusterConfig(
            replicas=2,
            max_replicas=3,
            replica_cpus=1.0,
            replica_threads=1,
            target_ongoing=2.0,
            upscale_delay=0.5,
            downscale_delay=3.0,
            max_queued=16,
            stats_period=0.25,
            ingress_cpus=0.25,
        )
        here = ray.util.get_node_ip_address()

        def deploy(shape: ClusterConfig) -> Any:
            return serve.run(build(shape, engine, server, MODEL, here), name=APP, route_prefix="/")

        yield LiveCluster(f"http://127.0.0.1:{port}", deploy(shape), deploy, shape)
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()
        os.environ.clear()
        os.environ.update(saved)
