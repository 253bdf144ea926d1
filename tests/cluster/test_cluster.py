"""The Ray Serve app end to end on a two-node local cluster: the official client through the ingress,
affinity and its load bound, one scrape for every replica, disconnects, a killed replica, autoscaling."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import ray

from tests.cluster.conftest import MODEL, LiveCluster, sustained_burst

REPLICA = "x-tailserve-replica"


def chat(system: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}


def wait_idle(cluster: LiveCluster, timeout: float = 5.0) -> None:
    """Until no replica holds a request and every KV block is free again."""
    end = time.monotonic() + timeout
    while True:
        states = cluster.states()
        if all(
            s["requests"] == 0 and s["in_flight"] == 0 and s["free_blocks"] == s["total_blocks"]
            for s in states
        ):
            return
        assert time.monotonic() < end, f"replicas still busy: {states}"
        time.sleep(0.05)


def test_openai_client_stream_and_not(cluster: LiveCluster) -> None:
    client = openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL]
    kw = chat("You are terse.", max_tokens=8)
    raw = client.chat.completions.with_raw_response.create(**kw)
    whole = raw.parse()
    assert raw.headers[REPLICA] and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # same weights on every replica, greedy
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    done = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens == 5 or done.choices[0].finish_reason == "stop"
    # The replica's own protocol errors come through unchanged (status, OpenAI body).
    bad = httpx.post(cluster.base_url + "/chat/completions", json={"model": "other", "messages": []})
    assert bad.status_code in (400, 404) and "error" in bad.json()


def test_replicas_span_both_nodes(cluster: LiveCluster) -> None:
    states = cluster.states()
    assert len(states) == 2 and len({s["node"] for s in states}) == 2


def test_affinity_keeps_a_prefix_on_one_replica(cluster: LiveCluster) -> None:
    seen: dict[str, set[str]] = {}
    for _ in range(3):
        for k in range(4):
            system = f"System prompt number {k}: answer as assistant {k}."
            r = httpx.post(cluster.base_url + "/chat/completions", json=chat(system), timeout=30)
            assert r.status_code == 200
            seen.setdefault(system, set()).add(r.headers[REPLICA])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    session = {
        httpx.post(
            cluster.base_url + "/chat/completions", json=chat(f"p{i}", user="alice"), timeout=30
        ).headers[REPLICA]
        for i in range(3)
    }
    assert len(session) == 1  # a session sticks whatever its prompts


def test_affinity_is_bounded_by_load(cluster: LiveCluster) -> None:
    n = 8
    body = chat("One hot system prompt shared by everyone.", max_tokens=60, ignore_eos=True)

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(
                *(client.post(cluster.base_url + "/chat/completions", json=body) for _ in range(n))
            )
        assert all(r.status_code == 200 for r in rs)
        return [r.headers[REPLICA] for r in rs]

    counts = Counter(asyncio.run(main()))
    assert len(counts) == 2 and max(counts.values()) <= math.ceil(1.25 * n / 2), counts


def test_one_scrape_has_every_replica(cluster: LiveCluster) -> None:
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    names = {s["replica"] for s in cluster.states()}
    for name in names:
        assert f'replica="{name}"' in text
    assert "tailserve_cluster_replicas 2.0" in text
    ttft = [
        line for line in text.splitlines() if line.startswith("tailserve:time_to_first_token_seconds_count")
    ]
    assert {line.split('replica="')[1].split('"')[0] for line in ttft} == names
    # Each replica's start → ready, warm-up included, exported as `tailserve serve` exports its own.
    ready = [line for line in text.splitlines() if line.startswith("tailserve:startup_seconds{")]
    assert {line.split('replica="')[1].split('"')[0] for line in ready} == names
    assert all(float(line.rsplit(" ", 1)[1]) > 0 for line in ready)
    phases = [ln for ln in text.splitlines() if ln.startswith("tailserve:startup_phase_seconds{")]
    assert len([ln for ln in phases if 'phase="warmup"' in ln]) == len(names)


def test_a_replica_logs_each_request_where_the_user_sees_it(cluster: LiveCluster) -> None:
    """One JSON line per request on the replica's real stderr (the worker's .err file, which Ray shows on
    the driver's console), as `tailserve serve` writes it, at once, not held in Ray Serve's buffer."""
    rid = f"log-{time.monotonic_ns()}"
    r = httpx.post(
        cluster.base_url + "/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    end = time.monotonic() + 10.0
    while True:
        lines = [
            line
            for f in logs.glob("worker-*.err")
            for line in f.read_text(errors="replace").splitlines()
            if rid in line
        ]
        if lines:
            break
        assert time.monotonic() < end, "no request log line from the replica"
        time.sleep(0.1)
    entry = json.loads(lines[0][lines[0].index("{") :])
    assert entry["event"] == "request" and entry["request_id"] == rid
    assert entry["status"] == 200 and entry["output_tokens"] == 2


def test_disconnect_frees_the_replicas_blocks(cluster: LiveCluster) -> None:
    wait_idle(cluster)
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", cluster.base_url + "/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            while not next(lines).startswith("data: {"):
                pass
        left = time.monotonic()
        assert any(s["requests"] == 1 for s in cluster.states())
    wait_idle(cluster, timeout=5.0)
    assert time.monotonic() - left < 5.0


def test_killed_replica_requests_are_resent(cluster: LiveCluster) -> None:
    wait_idle(cluster)
    body = {"model": MODEL, "prompt": "count slowly", "max_tokens": 300, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post(cluster.base_url + "/completions", json=body))
                for _ in range(6)
            ]
            victim = None
            for _ in range(100):  # until a replica is running some of them (a busy machine takes longer)
                await asyncio.sleep(0.1)
                states = await asyncio.to_thread(cluster.states)
                victim = next((s["replica"] for s in states if s["requests"]), None)
                if victim is not None:
                    break
            assert victim is not None, "no replica took the requests within 10 s"
            [name] = [
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].endswith(victim)
            ]
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks)

    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 6
    assert all(json.loads(r.text)["usage"]["completion_tokens"] == 300 for r in rs)
    resent = [
        line
        for line in httpx.get(cluster.url + "/metrics", timeout=30).text.splitlines()
        if line.startswith("tailserve_cluster_resent_total")
    ]
    assert float(resent[0].split()[-1]) >= 1
    cluster.wait_replicas(2, timeout=60)  # Ray started a replacement


def test_burst_scales_up_then_down_when_idle(cluster: LiveCluster) -> None:
    cluster.wait_replicas(2, timeout=60)
    body = {"model": MODEL, "prompt": "burst", "max_tokens": 300, "ignore_eos": True}

    def refused_as_full(r: httpx.Response) -> None:
        if r.status_code == 429:  # the cluster's (all full), or a replica's own admission
            assert r.json()["error"]["code"] in ("cluster_full", "queue_full") and r.headers["retry-after"]

    # A sustained burst: the load lasts until the new replica serves.
    scale_up, statuses = sustained_burst(
        cluster.base_url + "/completions", body, 48, lambda: cluster.wait_replicas(3, 90), refused_as_full
    )
    init = max(s["init_s"] for s in cluster.states())
    print(
        f"scale-up: {scale_up:.1f} s from the burst to 3 replicas serving; a replica's own start {init:.2f} s"
    )
    assert statuses[200] and set(statuses) <= {200, 429}, statuses
    assert statuses[429], statuses  # every replica full and the ingress queue at its cap
    wait_idle(cluster, timeout=10)
    cluster.wait_replicas(2, timeout=30)  # idle: back to the floor, the removed replica drained
