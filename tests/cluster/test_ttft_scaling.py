"""Scale-up on predicted TTFT (cluster/autoscale.py) on the live cluster. This module runs last in the
folder: it deploys the shared app anew with a shape no other test expects."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx

from tailserve.cluster import data_path
from tests.cluster.conftest import MODEL, LiveCluster, sustained_burst


def ingress_after_redeploy(cluster: LiveCluster, timeout: float) -> str:
    """The API's base URL once the redeployed ingress answers. A redeploy replaces every replica, the
    ingress too, and the new one starts while the old still holds the port: Ray gives it the next
    free port of the span (cluster/data_path.py). Highest first: the old one answers while it drains."""
    first = int(cluster.url.rsplit(":", 1)[1])
    end = time.monotonic() + timeout
    while True:
        for port in range(first + data_path.INGRESS_PORT_SPAN, first - 1, -1):
            url = f"http://127.0.0.1:{port}/v1"
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        assert time.monotonic() < end, f"no ingress answered in {timeout} s"
        time.sleep(0.2)


def test_a_backed_up_queue_scales_up_on_predicted_ttft_alone(cluster: LiveCluster) -> None:
    cluster.wait_replicas(2, timeout=60)
    prompt = "".join(chr(97 + i % 26) for i in range(300))  # 300 tokens (the tiny model's bytes)
    for _ in range(4):  # a measured prefill rate: what an idle replica predicts for a new request
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        assert httpx.post(cluster.base_url + "/completions", json=body, timeout=60).status_code == 200
    idle = max(s["ttft"] or 0.0 for s in cluster.states())
    assert idle > 0
    # Requests in flight cannot add a replica here (1,000 per replica as the target): only the
    # replicas' predicted TTFT, against 4× an idle one's, can.
    shape = replace(cluster.shape, target_ongoing=1000.0, scale_on_ttft=4 * idle)
    cluster.deploy(shape)
    cluster.wait_replicas(2, timeout=60)
    base_url = ingress_after_redeploy(cluster, timeout=60)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True}
    took, _ = sustained_burst(base_url + "/completions", body, 32, lambda: cluster.wait_replicas(3, 90))
    print(f"scale-up on predicted TTFT ({4 * idle * 1e3:.0f} ms): {took:.1f} s from the burst to 3 replicas")
