"""tailserve on Ray Serve against `tailserve serve`, side by side on this machine (issue 18).

1. Overhead: one replica behind the Ray Serve ingress vs one `tailserve serve`, same engine flags
   (the default model, 1 engine thread each), streaming completions of 32 tokens at c=1 and c=16;
   rounds alternate between the two and are pooled: TTFT p50/p99, ITL p50/p99, and the added TTFT
   with a 95 % interval from resampling whole rounds (harness.added_interval).
1b. Delivery: the same two endpoints and load, each request's TTFT split in three by its server's
   request log (found by its X-Request-ID): delivery (client send → the server app has it), the
   engine's own TTFT, and return (first token → client); at c=16, requests of the opening burst apart
   from those that followed one that ended.
2. Routing: 2 replicas, 8 distinct system prompts (~300 tokens each) in a seeded random order, c=8;
   our AffinityRouter vs Ray Serve's default (power of two choices): prefix hit rate (cached prompt
   tokens / prompt tokens, from each response's usage) and TTFT p50/p99. Rounds alternate.
3. 2 replicas × 1 thread vs 1 replica × 2 threads: output tokens/s at c=16.
4. Scale-up: autoscaling 1 → 2 replicas under a burst; from Ray's decision (the deployment turns
   UPSCALING) to the new replica RUNNING, i.e. constructed: process, imports, model load, warm-up.

    flock /work/bench.lock .venv/bin/python benchmarks/ray_serve.py [--rounds 3]
        [--parts overhead,delivery,routing,shapes,scaleup] [--default-path]

The cluster runs on tailserve's data path (cluster/data_path.py: Ray Serve's throughput-optimized mode,
the ingress replica serving HTTP itself); `--default-path` runs it on Ray Serve's defaults instead
(the HTTP proxy actor in front of the ingress), for the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import added_interval, quantile

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
ENGINE = {"num_threads": 1, "max_num_seqs": 32, "kv_cache_memory": 0.5}
WALL: dict[str, tuple[float, float]] = {}  # request id → (sent, first token), wall clock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


async def one(
    client: httpx.AsyncClient, url: str, body: dict, rid: str | None = None
) -> tuple[float, list[float], float, int]:
    """(TTFT, ITLs, cached share of the prompt, output chunks) of one streaming completion. With `rid`
    it goes as the request's X-Request-ID, and the wall-clock times of its send and first token are
    kept in WALL[rid] (the servers' request logs stamp in wall-clock time)."""
    t0 = time.perf_counter()
    wall0 = time.time()
    stamps: list[float] = []
    cached = prompt = 0
    headers = {"x-request-id": rid} if rid else None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200, r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                prompt = data["usage"]["prompt_tokens"]
                cached = (data["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if data["choices"] and data["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    if rid:
        WALL[rid] = (wall0, wall0 + stamps[0] - t0)
    return stamps[0] - t0, itl, cached / max(prompt, 1), len(stamps)


async def load(url: str, bodies: list[dict], concurrency: int, ids: list[str] | None = None) -> dict:
    queue = list(zip(bodies, ids or [None] * len(bodies)))
    out: list[tuple[float, list[float], float, int]] = []
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            body, rid = queue.pop(0)
            out.append(await one(client, url, body, rid))

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "ttft": [o[0] for o in out],
        "itl": [x for o in out for x in o[1]],
        "hit": [o[2] for o in out],
        "tokens": sum(o[3] for o in out),
        "wall": wall,
    }


def scale_up(serve, url: str, r: int) -> dict[str, float]:
    """Burst `url` (c=8) until the replica deployment has two RUNNING replicas; the seconds from the
    burst's start to Ray's decision (UPSCALING) and from the decision to the replica running."""
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            d = (await asyncio.to_thread(serve.status)).applications["bench"].deployments["replica"]
            now = time.perf_counter() - t0
            if d.status == "UPSCALING" or sum(d.replica_states.values()) > 1:
                stamps.setdefault("decided", now)  # a second replica is wanted (or already starting)
            if d.replica_states.get("RUNNING", 0) >= 2:
                stamps["running"] = now
                stop.set()
            await asyncio.sleep(0.05)

    async def burst(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=300) as client:

            async def worker(k: int) -> None:
                i = 0
                while not stop.is_set():
                    await one(client, url, completion(f"Burst {r}-{k}-{i}: a long story", 64))
                    i += 1

            await asyncio.gather(*(worker(k) for k in range(8)))

    async def main() -> None:
        stop = asyncio.Event()
        await asyncio.wait_for(asyncio.gather(watch(stop), burst(stop)), 300)

    asyncio.run(main())
    return {
        "burst_to_decision_s": stamps["decided"],
        "decision_to_running_s": stamps["running"] - stamps["decided"],
    }


def request_logs(paths: list[Path]) -> dict[str, dict]:
    """The servers' request-log entries (one JSON line per request) by request id."""
    entries: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            start = line.find('{"event":"request"')
            if start >= 0:
                entry = json.loads(line[start:])
                entries[entry["request_id"]] = entry
    return entries


def delivery_split(entries: dict[str, dict], concurrency: int) -> dict[str, dict[str, float]]:
    """Each request's TTFT in three parts, from the client's stamps (WALL) and its server's log line:
    delivery (sent → the server app has it), the engine's TTFT, and return (first token → client).
    The log stamps the response's end in wall-clock ms; minus its network and e2e times, that is the
    arrival. Grouped by endpoint and, at c > 1, by whether the request came in the opening burst (the
    first `concurrency` sent at once) or followed one that ended."""
    parts: dict[str, dict[str, list[float]]] = {}
    for rid, (sent, first) in WALL.items():
        entry = entries.get(rid)
        name, c, _, i = rid.split("-")
        if entry is None or int(c) != concurrency:
            continue
        arrival = entry["time"] - entry["network_s"] - entry["e2e_s"]
        group = f"{name}-c{c}" + ("" if concurrency == 1 else "-burst" if int(i) < concurrency else "-follow")
        into = parts.setdefault(group, {"client_ttft": [], "delivery": [], "engine_ttft": [], "return": []})
        into["client_ttft"].append(first - sent)
        into["delivery"].append(arrival - sent)
        into["engine_ttft"].append(entry["ttft_s"])
        into["return"].append(first - arrival - entry["ttft_s"])
    return {
        g: {"n": len(v["delivery"])}
        | {f"{k}_p50": q(x, 0.5) for k, x in v.items()}
        | {f"{k}_mean": statistics.mean(x) * 1000 for k, x in v.items()}
        for g, v in sorted(parts.items())
    }


def q(xs: list[float], p: float) -> float:
    return quantile(xs, p) * 1000  # in ms


def completion(prompt: str, tokens: int = 32) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }


def one_replica_beside(
    serve, here: str | None, ray_url: str, plain_url: str, request_log: bool = False
) -> None:
    """The overhead setup: one replica deployed and, with the plain server at `plain_url`, ready and
    warmed."""
    deploy(serve, {"replicas": 1, "replica_cpus": 1.0, "ingress_cpus": 0.5}, {}, "bench", here, request_log)
    for url in (ray_url, plain_url):
        wait_ready(url)
        asyncio.run(load(url, [completion("warm up")] * 4, 2))


def alternate(
    urls: dict[str, str], args: argparse.Namespace, c: int, tagged: bool = False
) -> list[tuple[str, dict]]:
    """`args.rounds` rounds of `args.requests` streamed completions at concurrency `c` against each
    endpoint, the order reversed every other round: (endpoint, its `load`) per run. With `tagged`,
    each request carries the X-Request-ID `name-c-round-i` (WALL keeps its stamps)."""
    runs = []
    for r in range(args.rounds):
        order = list(urls.items())
        for name, url in order if r % 2 == 0 else order[::-1]:
            bodies = [completion(f"Request {r}-{i}: tell me about the sea.") for i in range(args.requests)]
            ids = [f"{name}-{c}-{r}-{i}" for i in range(args.requests)] if tagged else None
            runs.append((name, asyncio.run(load(url, bodies, c, ids))))
    return runs


def start_plain(port: int, log: Path | None = None) -> subprocess.Popen:
    """One `tailserve serve` with the replicas' engine flags; with `log`, its request log goes there."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    cmd = [sys.executable, "-m", "tailserve.cli", "serve", "--port", str(port), *flags]
    return subprocess.Popen(
        cmd if log else [*cmd, "--no-request-log"],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w") if log else subprocess.DEVNULL,
    )


def deploy(
    serve,
    cluster_kw: dict,
    engine_kw: dict,
    name: str,
    ingress_node: str | None = None,
    request_log: bool = False,
) -> None:
    from tailserve.cluster.app import build
    from tailserve.cluster.config import ClusterConfig
    from tailserve.config import EngineConfig, ServerConfig

    engine = EngineConfig(model=MODEL, **{**ENGINE, **engine_kw})
    server = ServerConfig(request_log=request_log)
    app = build(ClusterConfig(**cluster_kw), engine, server, MODEL, ingress_node)
    serve.run(app, name=name, route_prefix="/")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--parts", default="overhead,delivery,routing,shapes,scaleup")
    ap.add_argument("--default-path", action="store_true", help="Ray Serve's default data path")
    ap.add_argument("--tag", default="", help="recorded/ray_serve-TAG.json instead of ray_serve.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    from tailserve.cluster import data_path

    ray_port, plain_port = free_port(), free_port()
    path_env = {} if args.default_path else data_path.use(ray_port)  # before Ray Serve is imported
    import ray
    from ray import serve

    results: dict = {
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "data_path": "ray-default" if args.default_path else "tailserve",
    }
    env = {"PYTHONPATH": str(ROOT / "src"), **path_env}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    proxy_port = ray_port if args.default_path else free_port()  # ours: the ingress serves ray_port
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    here = None if args.default_path else ray.util.get_node_ip_address()
    ray_url, plain_url = f"http://127.0.0.1:{ray_port}", f"http://127.0.0.1:{plain_port}"
    plain = start_plain(plain_port)
    try:
        if "overhead" in parts:
            # 1. overhead
            one_replica_beside(serve, here, ray_url, plain_url)
            overhead = {}
            for c in (1, 16):
                pooled: dict[str, dict[str, list[float]]] = {
                    "ray": {"ttft": [], "itl": []},
                    "serve": {"ttft": [], "itl": []},
                }
                rounds: dict[str, list[list[float]]] = {"ray": [], "serve": []}
                for name, got in alternate({"ray": ray_url, "serve": plain_url}, args, c):
                    pooled[name]["ttft"] += got["ttft"]
                    pooled[name]["itl"] += got["itl"]
                    rounds[name].append(got["ttft"])
                overhead[c] = {
                    n: {
                        "ttft_p50": q(v["ttft"], 0.5),
                        "ttft_p99": q(v["ttft"], 0.99),
                        "itl_p50": q(v["itl"], 0.5),
                        "itl_p99": q(v["itl"], 0.99),
                    }
                    for n, v in pooled.items()
                }
                for p, key in ((0.5, "p50"), (0.99, "p99")):
                    added, low, high = added_interval(rounds["serve"], rounds["ray"], p)
                    overhead[c][f"ttft_added_{key}_ms"] = [added * 1000, low * 1000, high * 1000]
                print(f"c={c}", json.dumps(overhead[c]), flush=True)
            results["overhead"] = overhead
            serve.delete("bench")

        if "delivery" in parts:
            # 1b. where the overhead's time goes: delivery, engine, return (both servers' request logs)
            log_port = free_port()
            plain_log = ROOT / "benchmarks" / "results" / "ray_serve-plain-requests.log"
            plain_log.parent.mkdir(parents=True, exist_ok=True)
            logged = start_plain(log_port, plain_log)
            log_url = f"http://127.0.0.1:{log_port}"
            try:
                one_replica_beside(serve, here, ray_url, log_url, request_log=True)
                for c in (1, 16):
                    alternate({"ray": ray_url, "serve": log_url}, args, c, tagged=True)
                time.sleep(2.0)  # the servers write their request logs off the hot path
                worker_logs = Path(ray._private.worker._global_node.get_logs_dir_path()).glob("worker-*.err")
                entries = request_logs([plain_log, *worker_logs])
                results["delivery"] = {f"c{c}": delivery_split(entries, c) for c in (1, 16)}
                print("delivery", json.dumps(results["delivery"]), flush=True)
                serve.delete("bench")
            finally:
                logged.terminate()
                logged.wait(timeout=30)

        if "routing" in parts:
            # 2. routing
            rng = random.Random(0)
            systems = [
                f"System {k}: "
                + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "sea", "sky"]) for _ in range(250))
                for k in range(8)
            ]
            routing: dict[str, dict[str, list[float]]] = {}
            for r in range(args.rounds):
                for router in ["affinity", "ray"] if r % 2 == 0 else ["ray", "affinity"]:
                    deploy(
                        serve,
                        {"replicas": 2, "replica_cpus": 1.0, "ingress_cpus": 0.5, "router": router},
                        {},
                        "bench",
                        here,
                    )
                    wait_ready(ray_url)
                    order = random.Random(r).choices(range(8), k=48)
                    bodies = [
                        completion(systems[k] + f"\nQuestion {i}: why?", 8) for i, k in enumerate(order)
                    ]
                    got = asyncio.run(load(ray_url, bodies, 8))
                    into = routing.setdefault(router, {"ttft": [], "hit": []})
                    into["ttft"] += got["ttft"]
                    into["hit"] += got["hit"]
                    serve.delete("bench")
            results["routing"] = {
                n: {
                    "hit_rate": statistics.mean(v["hit"]),
                    "ttft_p50": q(v["ttft"], 0.5),
                    "ttft_p99": q(v["ttft"], 0.99),
                }
                for n, v in routing.items()
            }
            print("routing", json.dumps(results["routing"]), flush=True)

        if "shapes" in parts:
            # 3. 2 replicas x 1 thread vs 1 replica x 2 threads
            shapes = {
                "2x1": ({"replicas": 2, "replica_cpus": 1.0}, {"num_threads": 1}),
                "1x2": ({"replicas": 1, "replica_cpus": 2.0}, {"num_threads": 2}),
            }
            tput: dict[str, list[float]] = {}
            for r in range(args.rounds):
                for name in ["2x1", "1x2"] if r % 2 == 0 else ["1x2", "2x1"]:
                    ckw, ekw = shapes[name]
                    deploy(serve, {**ckw, "ingress_cpus": 0.5}, ekw, "bench", here)
                    wait_ready(ray_url)
                    bodies = [completion(f"Shape {r}-{i}: a story") for i in range(args.requests)]
                    got = asyncio.run(load(ray_url, bodies, 16))
                    tput.setdefault(name, []).append(got["tokens"] / got["wall"])
                    serve.delete("bench")
            results["shapes"] = {n: statistics.median(v) for n, v in tput.items()}
            print("shapes", json.dumps(results["shapes"]), flush=True)

        if "scaleup" in parts:
            # 4. from the autoscaler's decision to a second replica serving
            scale = {"replicas": 1, "max_replicas": 2, "target_ongoing": 2.0, "upscale_delay": 0.5}
            results["scaleup"] = []
            for r in range(args.rounds):
                deploy(serve, {**scale, "replica_cpus": 1.0, "ingress_cpus": 0.5}, {}, "bench", here)
                wait_ready(ray_url)
                results["scaleup"].append(scale_up(serve, ray_url, r))
                print("scaleup", json.dumps(results["scaleup"][-1]), flush=True)
                serve.delete("bench")
    finally:
        plain.terminate()
        plain.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()
    out = ROOT / "benchmarks" / "recorded" / f"ray_serve{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
