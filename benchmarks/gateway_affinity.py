"""Routing policy against prefix reuse: two tailserve backends behind gateways that differ only in
their routing settings (affinity at the default load factor 1.25 and at 1.5, least_loaded,
round_robin), measured in one run.

Workload: `tailserve bench --workload chat --system-prompts 8` (eight distinct ~400-token system
prompts drawn evenly), and the skewed mix `--hot-share 0.8` (one prompt 80 % of requests). Every
(round, mix, policy) run has its own seed, hence its own eight system prompts: what one run left in
the backends' prefix caches is of no use to the next, so each policy starts from the same cold
cache. Policies alternate in order every round. Reported, pooled over rounds: the prefix-cache hit
rate (prompt tokens found in the cache over prompt tokens looked up, summed over both backends'
/metrics across the run) and TTFT p50/p99.

Every choice is recorded too: the gateways log a line per choice at debug level (key, backend, why,
each backend's load and prediction), and each run's lines give the distinct (prompt, backend) pairs
it made, i.e. how many times a system prompt had to be prefilled cold (ideal affinity: once per
prompt; round robin: once per prompt and backend), and the choices by reason.

    .venv/bin/python benchmarks/gateway_affinity.py [--rounds 2] [--requests 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import httpx
from harness import RECORDED, RESULTS, closed_loop, header, quantile, serving, tailserve_cmd

MODEL = "smollm2-135m-instruct"
BACKEND_PORTS = (8170, 8171)
POLICIES = {  # label → the gateway config's routing settings (load factors named, whatever the default)
    "affinity_c1.25": {"policy": "affinity", "load_factor": 1.25},
    "affinity_c1.5": {"policy": "affinity", "load_factor": 1.5},
    "least_loaded": {"policy": "least_loaded"},
    "round_robin": {"policy": "round_robin"},
}
MIXES = {"even": [], "hot80": ["--hot-share", "0.8"]}


def cache_counts(urls: list[str]) -> tuple[float, float]:
    """(prefix-cache hits, queries) in prompt tokens, summed over the backends."""
    hits = queries = 0.0
    for url in urls:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("tailserve:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("tailserve:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


ROUTE = re.compile(r"route key=(\S+) backend=(\S+) reason=(\w+)")


def choices(log: Path, start: int) -> tuple[list[tuple[str, str, str]], int]:
    """(key, backend, reason) of each choice the gateway logged after byte `start`; and the new end."""
    data = log.read_bytes()
    return [m.groups() for m in ROUTE.finditer(data[start:].decode(errors="replace"))], len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--backend-flags", default="--num-threads 1", help="extra `tailserve serve` flags")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset to run")
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma-separated subset to run")
    ap.add_argument(
        "--record", default="gateway_affinity.json", help="summary file under benchmarks/recorded"
    )
    args = ap.parse_args()
    policies = tuple(p for p in POLICIES if p in args.policies.split(","))
    mixes = {m: f for m, f in MIXES.items() if m in args.mixes.split(",")}
    stats = {
        (m, p): {"ttft": [], "hits": 0.0, "queries": 0.0, "failed": 0, "cold": 0, "reasons": Counter()}
        for m in mixes
        for p in policies
    }
    with contextlib.ExitStack() as stack:
        backends = [
            stack.enter_context(
                serving(
                    tailserve_cmd(port, "--max-num-seqs", "16", *args.backend_flags.split()),
                    port,
                    RESULTS / f"affinity-backend-{port}.log",
                )
            )
            for port in BACKEND_PORTS
        ]
        gateways, logs, ends = {}, {}, {}
        for i, policy in enumerate(policies):
            config = RESULTS / f"affinity-{policy}.yaml"
            config.write_text(
                json.dumps(
                    {
                        **POLICIES[policy],
                        "poll_interval": 0.5,
                        "models": {MODEL: {"backends": [{"url": u, "kind": "tailserve"} for u in backends]}},
                    }
                )
            )
            port = BACKEND_PORTS[-1] + 1 + i
            cmd = [sys.executable, "-m", "tailserve.cli", "gateway", "--config", str(config)]
            cmd += ["--port", str(port), "--log-level", "debug"]
            logs[policy] = RESULTS / f"affinity-gw-{policy}.log"
            gateways[policy] = stack.enter_context(serving(cmd, port, logs[policy]))
            ends[policy] = logs[policy].stat().st_size
        for r in range(args.rounds):
            order = policies if r % 2 == 0 else policies[::-1]
            for j, (mix, flags) in enumerate(mixes.items()):
                for k, policy in enumerate(order):
                    seed = 1000 * (r + 1) + 10 * j + k  # fresh system prompts for every run
                    before = cache_counts(backends)
                    run = closed_loop(
                        gateways[policy], RESULTS / f"affinity-{mix}-{policy}-r{r}", "chat",
                        args.concurrency, args.requests, args.output_tokens, seed,
                        "--system-prompts", "8", *flags, "--model", MODEL, "--warmup", "0",
                    )  # fmt: skip
                    after = cache_counts(backends)
                    routed, ends[policy] = choices(logs[policy], ends[policy])
                    cold = len({(key, b) for key, b, _ in routed})
                    reasons = Counter(reason for _, _, reason in routed)
                    s = stats[mix, policy]
                    s["cold"] += cold
                    s["reasons"] += reasons
                    ok = [x["ttft_s"] for x in run["requests"] if x["status"] == "ok"]
                    s["ttft"] += ok
                    s["failed"] += len(run["requests"]) - len(ok)
                    s["hits"] += after[0] - before[0]
                    s["queries"] += after[1] - before[1]
                    rate = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    print(
                        f"round {r} {mix} {policy}: ok {len(ok)}, hit rate {rate:.3f}, {cold} cold "
                        f"(prompt, backend) pairs over {len({k for k, _, _ in routed})} prompts, "
                        f"{dict(reasons)}",
                        flush=True,
                    )
    summary = {
        f"{mix}-{policy}": {
            "requests_ok": len(s["ttft"]),
            "requests_failed": s["failed"],
            "prefix_hit_rate": s["hits"] / max(1.0, s["queries"]),
            "ttft_p50_s": quantile(s["ttft"], 0.5),
            "ttft_p99_s": quantile(s["ttft"], 0.99),
            "cold_prompt_backend_pairs": s["cold"],
            "choices_by_reason": dict(s["reasons"]),
        }
        for (mix, policy), s in stats.items()
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    record = {"config": vars(args), "summary": summary}
    (RECORDED / args.record).write_text(json.dumps(record, indent=2))
    print(header("Gateway routing policy vs prefix reuse", "python benchmarks/gateway_affinity.py"))
    print(
        "| mix | policy | ok | prefix-cache hit rate | cold (prompt, backend) pairs | TTFT p50 | TTFT p99 |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        mix, policy = key.split("-", 1)
        ok = f"{s['requests_ok']}/{s['requests_ok'] + s['requests_failed']}"
        cells = [mix, policy, ok, f"{s['prefix_hit_rate']:.3f}", str(s["cold_prompt_backend_pairs"])]
        cells += [f"{s[k] * 1e3:.0f} ms" for k in ("ttft_p50_s", "ttft_p99_s")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
