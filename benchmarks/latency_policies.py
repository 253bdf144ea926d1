"""The gateway's latency policies, each measured against not using it, side by side in one run
(rounds alternate between the two settings and are pooled, so the machine's drift hits both alike):

- hedge: two SmolLM2 backends, one holding a share of its requests before they reach the engine
  (`--stall-share/--stall-seconds`, server/faults.py); a gateway with hedging (delay = the backend's
  observed p95 TTFT) and one without, over the same backends: TTFT p50/p99 and the extra requests.
- tiers: SmolLM2-135M as the small tier and Gemma 3 270M as the large one behind one group; a mixed
  workload (short questions, code, math, long documents) through the group's router, and the same
  workload sent to the large tier alone: share per tier, router latency, TTFT and e2e p50/p99.
- degrade: bursts that overload the large tier, through a group with degrade (TTFT SLO), one that also
  sheds what no tier can serve in time, and one without: TTFT p99 (of the served), the shares
  degraded and shed.

    .venv/bin/python benchmarks/latency_policies.py [--parts hedge,tiers,degrade] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from harness import RECORDED, RESULTS, header, quantile, serving, tailserve_cmd

from tailserve.routing.tiers import FeatureRouter

FIRST_PORT = 8170
SMALL, LARGE = "smollm2-135m-instruct", "gemma3-270m"
TIER_HEADER = "x-tailserve-tier"


def q(xs: list[float], p: float) -> float | None:
    return round(quantile(xs, p), 4) if xs else None


async def one(client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str]) -> dict[str, Any]:
    """A streamed request: TTFT (first content chunk), e2e, and the gateway's tier headers."""
    start = time.monotonic()
    ttft = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                ttft = time.monotonic() - start
        return {
            "status": r.status_code,
            "ttft": ttft,
            "e2e": time.monotonic() - start,
            "tier": r.headers.get(TIER_HEADER),
            "degraded": r.headers.get("x-tailserve-degraded"),
        }


async def closed_loop(url: str, bodies: list[dict], concurrency: int, headers: dict[str, str]) -> list[dict]:
    """The answers in the order of `bodies`."""
    queue = list(enumerate(bodies))
    out: list[dict] = [{} for _ in bodies]
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:

        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                out[i] = await one(client, url, body, headers)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def burst(url: str, bodies: list[dict], headers: dict[str, str]) -> list[dict]:
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        return list(await asyncio.gather(*(one(client, url, b, headers) for b in bodies)))


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tailserve:gateway_" + name) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def latency(rs: list[dict]) -> dict[str, Any]:
    ok = [r for r in rs if r["status"] == 200 and r["ttft"] is not None]
    t, e = [r["ttft"] for r in ok], [r["e2e"] for r in ok]
    return {
        "n": len(rs),
        "failed": len(rs) - len(ok),
        "ttft_p50_s": q(t, 0.5),
        "ttft_p99_s": q(t, 0.99),
        "e2e_p50_s": q(e, 0.5),
        "e2e_p99_s": q(e, 0.99),
    }


def gateway_cmd(config: dict, name: str, port: int) -> list[str]:
    path = RESULTS / f"policies-{name}.yaml"
    path.write_text(json.dumps(config))
    return [sys.executable, "-m", "tailserve.cli", "gateway", "--config", str(path), "--port", str(port)]


def chat(text: str, tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "stream": True}


# --- hedge ------------------------------------------------------------------------------------------


def run_hedge(args: argparse.Namespace, stack: ExitStack) -> dict:
    ports = [FIRST_PORT, FIRST_PORT + 1]
    flags = ["--num-threads", "1", "--served-model-name", "m", "--max-num-seqs", "16"]
    stall = ["--stall-share", str(args.stall_share), "--stall-seconds", str(args.stall_seconds)]
    slow = stack.enter_context(
        serving(tailserve_cmd(ports[0], *flags, *stall), ports[0], RESULTS / "policies-slow.log")
    )
    fast = stack.enter_context(
        serving(tailserve_cmd(ports[1], *flags), ports[1], RESULTS / "policies-fast.log")
    )
    backends = [{"url": u, "kind": "tailserve"} for u in (slow, fast)]
    hedge = {"max_share": args.hedge_share, "min_samples": 20}
    gws = {}
    for i, (name, extra) in enumerate((("off", {}), ("on", {"hedge": hedge}))):
        port = FIRST_PORT + 2 + i
        cfg = {"poll_interval": 0.5, "models": {"m": {"backends": backends, **extra}}}
        gws[name] = stack.enter_context(
            serving(gateway_cmd(cfg, "hedge-" + name, port), port, RESULTS / f"policies-gw-hedge-{name}.log",
                    ready_path="/health")
        )  # fmt: skip
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "cats",
        "watch",
    ]
    pooled: dict[str, list[dict]] = {"off": [], "on": []}
    for rnd in range(args.rounds + 1):  # round 0 warms both (and the hedger's p95), and is not kept
        for name in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
            bodies = [
                {"model": "m", **chat(" ".join(rng.choices(words, k=12)), args.output_tokens)}
                for _ in range(args.hedge_requests)
            ]
            rs = asyncio.run(closed_loop(gws[name], bodies, args.concurrency, {}))
            if rnd:
                pooled[name] += rs
    out: dict[str, Any] = {}
    for name, url in gws.items():
        sent = metric(url, "hedges_total", event="sent")
        requests = metric(url, "requests_total")
        out[name] = {
            **latency(pooled[name]),
            "hedges_sent": sent,
            "hedges_won": metric(url, "hedges_total", event="won"),
            "extra_requests_share": round(sent / requests, 4) if requests else None,
        }
    off, on = out["off"]["ttft_p99_s"], out["on"]["ttft_p99_s"]
    out["p99_ttft_ratio_off_over_on"] = round(off / on, 2) if off and on else None
    return out


# --- tiers and degrade --------------------------------------------------------------------------


def mixed(rng: random.Random, n: int, tokens: int) -> list[tuple[str, dict]]:
    """(kind, body): 60 % short questions, 15 % code, 15 % math, 10 % long documents."""
    places = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada"]
    out = []
    for _ in range(n):
        x = rng.random()
        if x < 0.6:
            kind, text = "simple", f"What is the capital of {rng.choice(places)}? Answer in one word."
        elif x < 0.75:
            kind, text = (
                "code",
                f"Fix this:\n```python\ndef f(x):\n    return x +\n```\nwith x = {rng.randint(1, 99)}",
            )
        elif x < 0.9:
            kind, text = (
                "math",
                f"Solve for x: {rng.randint(2, 9)}x + {rng.randint(1, 20)} = {rng.randint(30, 90)}",
            )
        else:
            doc = " ".join(
                f"{rng.choice(places)} exports grain and steel in year {1900 + i}." for i in range(50)
            )
            kind, text = "long", "Summarise this report:\n" + doc
        out.append((kind, chat(text, tokens)))
    return out


def tier_backends(stack: ExitStack) -> tuple[str, str]:
    small = stack.enter_context(
        serving(
            tailserve_cmd(FIRST_PORT + 4, "--num-threads", "1", "--served-model-name", "s"),
            FIRST_PORT + 4,
            RESULTS / "policies-small.log",
        )
    )
    large = stack.enter_context(
        serving(
            tailserve_cmd(FIRST_PORT + 5, "--model", LARGE, "--num-threads", "1", "--served-model-name", "l"),
            FIRST_PORT + 5,
            RESULTS / "policies-large.log",
        )
    )
    return small, large


def run_tiers(args: argparse.Namespace, gw: str) -> dict:
    rng = random.Random(1)
    pooled: dict[str, list[dict]] = {"router": [], "all_large": []}
    kinds: list[str] = []
    for rnd in range(args.rounds + 1):
        work = mixed(rng, args.tier_requests, args.output_tokens)
        for name in ("router", "all_large") if rnd % 2 == 0 else ("all_large", "router"):
            model = "group" if name == "router" else "l"
            bodies = [{"model": model, **b} for _, b in work]
            rs = asyncio.run(closed_loop(gw, bodies, args.concurrency, {}))
            if rnd:
                pooled[name] += rs
                if name == "router":
                    kinds += [k for k, _ in work]
    routed = pooled["router"]
    share = {t: round(sum(r["tier"] == t for r in routed) / len(routed), 3) for t in ("small", "large")}
    by_kind = {
        k: {
            t: sum(1 for r, kk in zip(routed, kinds, strict=True) if kk == k and r["tier"] == t)
            for t in ("small", "large")
        }
        for k in ("simple", "code", "math", "long")
    }
    # The router on its own, on this workload's bodies: its latency without the HTTP around it.
    router, bodies = FeatureRouter(), [b for _, b in mixed(random.Random(2), 2000, 16)]
    times = []
    for b in bodies:
        start = time.perf_counter()
        router.route(b, None, ["small", "large"])
        times.append(time.perf_counter() - start)
    return {
        "router": latency(routed),
        "all_large": latency(pooled["all_large"]),
        "share_per_tier": share,
        "tier_by_kind": by_kind,
        "router_in_process_p50_us": round(sorted(times)[len(times) // 2] * 1e6, 1),
        "router_in_process_p99_us": round(sorted(times)[int(0.99 * len(times))] * 1e6, 1),
        "router_seconds_metric_count": metric(gw, "router_seconds_count", model="group"),
        "router_seconds_metric_le_1ms": metric(gw, "router_seconds_bucket", model="group", le="0.001"),
    }


def run_degrade(args: argparse.Namespace, gw: str) -> dict:
    rng = random.Random(3)
    models = {"on": "degrade", "off": "plain", "shed": "shed"}
    pooled: dict[str, list[dict]] = {name: [] for name in models}

    def bodies(model: str, n: int) -> list[dict]:
        text = " ".join(rng.choice(["sun", "rain", "wind", "snow", "fog"]) for _ in range(150))
        return [
            {"model": model, **chat(f"{i}: {text}. Which is most common?", args.output_tokens)}
            for i in range(n)
        ]

    hint = {TIER_HEADER: "large"}  # every request routed to the large tier: the burst is its load
    warm = asyncio.run(closed_loop(gw, bodies("plain", 4), 1, hint))  # its prefill rate, measured
    unloaded = q([r["ttft"] for r in warm], 0.5) or 1.0
    slo = args.slo or round(args.slo_factor * unloaded, 2)
    headers = {**hint, "x-tailserve-ttft-slo": str(slo)}
    names = list(models)
    for rnd in range(args.rounds):
        for name in names[rnd % 3 :] + names[: rnd % 3]:  # each setting leads a round in turn
            pooled[name] += asyncio.run(burst(gw, bodies(models[name], args.burst), headers))
            time.sleep(1.0)
    out: dict[str, Any] = {}
    for name, rs in pooled.items():
        shed = [r for r in rs if r["status"] == 503 and r["degraded"] == "shed"]
        served = [r for r in rs if r not in shed]
        out[name] = {
            **latency(served),  # shed requests have no TTFT: the percentiles are the served ones'
            "shed_share": round(len(shed) / len(rs), 3),
            "degraded_share": round(sum(r["degraded"] not in (None, "shed") for r in rs) / len(rs), 3),
            "within_slo_share": round(
                sum(r["ttft"] is not None and r["ttft"] <= slo for r in rs) / len(rs), 3
            ),
        }
    out["slo_s"], out["large_unloaded_ttft_p50_s"] = slo, unloaded
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="hedge,tiers,degrade")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--output-tokens", type=int, default=8)
    ap.add_argument("--hedge-requests", type=int, default=100, help="per round and setting")
    ap.add_argument("--stall-share", type=float, default=0.03)
    ap.add_argument("--stall-seconds", type=float, default=1.0)
    ap.add_argument("--hedge-share", type=float, default=0.1)
    ap.add_argument("--tier-requests", type=int, default=40, help="per round and setting")
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--slo", type=float, default=None, help="TTFT SLO of the burst's requests, seconds")
    ap.add_argument(
        "--slo-factor", type=float, default=3.0, help="without --slo: × the large's unloaded TTFT"
    )
    args = ap.parse_args()
    # A `timeout` sends SIGTERM: exit through the `finally`s, so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = args.parts.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": vars(args)}
    with ExitStack() as stack:
        if "hedge" in parts:
            key = f"hedge_stall_{args.stall_seconds:g}s"  # runs with other stalls keep their own figures
            results[key] = run_hedge(args, stack)
            print(json.dumps(results[key], indent=2), flush=True)
        if "tiers" in parts or "degrade" in parts:
            small, large = tier_backends(stack)
            tiers = {"small": "s", "large": "l"}
            cfg = {
                "poll_interval": 0.5,
                "models": {
                    "s": {"backends": [{"url": small, "kind": "tailserve"}]},
                    "l": {"backends": [{"url": large, "kind": "tailserve"}]},
                    "group": {"group": {"tiers": tiers}},
                    "plain": {"group": {"tiers": tiers}},
                    "degrade": {
                        "group": {
                            "tiers": tiers,
                            "degrade": {"ttft_slo": 10.0, "order": ["large", "small"]},
                        }
                    },
                    "shed": {
                        "group": {
                            "tiers": tiers,
                            "degrade": {"ttft_slo": 10.0, "order": ["large", "small"], "shed": True},
                        }
                    },
                },
            }
            port = FIRST_PORT + 6
            gw = stack.enter_context(
                serving(
                    gateway_cmd(cfg, "tiers", port),
                    port,
                    RESULTS / "policies-gw-tiers.log",
                    ready_path="/health",
                )
            )
            if "tiers" in parts:
                results["tiers"] = run_tiers(args, gw)
                print(json.dumps(results["tiers"], indent=2), flush=True)
            if "degrade" in parts:
                key = f"degrade_burst{args.burst}"  # runs with other bursts keep their own figures
                results[key] = run_degrade(args, gw)
                print(json.dumps(results[key], indent=2), flush=True)
    RECORDED.mkdir(parents=True, exist_ok=True)
    out = RECORDED / "latency_policies.json"
    if out.exists():  # parts run separately keep the others' figures
        results = {**json.loads(out.read_text()), **results}
    out.write_text(json.dumps(results, indent=2))
    print(header("Latency policies", "python benchmarks/latency_policies.py " + " ".join(sys.argv[1:])))
    print(Path(out).read_text())


if __name__ == "__main__":
    main()
