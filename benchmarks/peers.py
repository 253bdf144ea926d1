"""tailserve against its peers (llama.cpp server, vLLM CPU) on the same model and seeded chat workload.

The servers are all started on 127.0.0.1 (an idle one takes ~1 % of a core), then loaded with
`tailserve bench --workload chat` (64 output tokens, ignore_eos, greedy) at each concurrency for
`--rounds` rounds, round r with seed r, the servers' order changing every round so that each takes each
place equally often (harness.round_order), so the machine's drift (it moves 10–30 % over minutes) hits
every server alike. Each row pools its rounds' requests:
TTFT and ITL percentiles over all of them (a p99 of one 32-request run is its maximum), throughput the
median round. Prints a markdown table with ratios against tailserve and each row's share of the
machine's bandwidth and compute ceilings (ceilings.py, measured first), and writes
benchmarks/recorded/peers.json.

    .venv/bin/python benchmarks/peers.py [--peers tailserve,llamacpp,vllm] [--concurrency 1,8,16] [--rounds 3]
        [--model gemma3-270m]

`--against DIR` adds a peer "baseline": tailserve from another checkout's `src` (a baseline commit), in the
same alternating rounds, so a change to the serving path is measured side by side with what it changes.

TAILSERVE_CPU_TIER=avx2 LLAMA_CPU_TIER=avx2 VLLM_CPU_TIER=avx2 caps all three servers to AVX2.

Every server serves the same GGUF (`--model`, a name ceilings.MODELS knows; tailserve gets it as
`--model`). The default model's results go to peers.json (peers-<tier>.json for a capped tier),
another model's to peers-<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path

from ceilings import MODELS, measure, shares
from harness import PEERS, RECORDED, RESULTS, closed_loop, header, round_order, serving, tailserve_cmd

from tailserve.bench.stats import dist
from tailserve.layers import kernels
from tailserve.models.loader import resolve_model

PORTS = {"tailserve": 8100, "llamacpp": 8101, "vllm": 8102, "baseline": 8103}
DEFAULT_MODEL = "smollm2-135m-instruct"


def server_cmd(name: str, gguf: str, extra: list[str], model: str, against: Path | None = None) -> list[str]:
    port = str(PORTS[name])
    if name == "tailserve":
        return tailserve_cmd(PORTS[name], "--model", model, *extra)
    if name == "baseline":
        assert against is not None
        return [
            "env",
            f"PYTHONPATH={against.resolve() / 'src'}",
            *tailserve_cmd(PORTS[name], "--model", model, *extra),
        ]
    if name == "llamacpp":
        return ["bash", str(PEERS / "llama_server.sh"), "serve", gguf, port, "16"]
    return [*vllm_cap(), "bash", str(PEERS / "vllm_cpu.sh"), "serve", gguf, port]


def vllm_cap() -> list[str]:
    """`env` settings that run vLLM as on an AVX2-only CPU when VLLM_CPU_TIER=avx2 (vllm_avx2/ says how):
    the third peer capped like tailserve's tier and llama.cpp's AVX2 build."""
    tier = os.environ.get("VLLM_CPU_TIER", "native")
    if tier == "native":
        return []
    if tier != "avx2":
        raise SystemExit("VLLM_CPU_TIER must be native or avx2")
    shim = Path(__file__).parent / "vllm_avx2"
    return ["env", f"PYTHONPATH={shim}", "ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2"]


def pooled(
    rounds: list[dict], c: int, name: str, ceil: dict[str, float], output_tokens: int, model: str
) -> dict:
    """One table row from a server's rounds at concurrency c: percentiles over every completed request
    of every round, throughput the median round's."""
    done = [r for run in rounds for r in run["requests"] if r["status"] == "ok"]
    ttft, itl = dist(r["ttft_s"] for r in done), dist(x for r in done for x in r["itl_s"])
    assert ttft and itl, f"{name} completed no request at concurrency {c}"
    row = {
        "ok": len(done),
        "requests": sum(run["summary"]["counts"]["sent"] for run in rounds),
        "rounds": len(rounds),
        "ttft_p50": ttft["p50"],
        "ttft_p99": ttft["p99"],
        "itl_p50": itl["p50"],
        "itl_p99": itl["p99"],
        "output_tok_s": statistics.median(run["summary"]["throughput"]["output_tok_per_s"] for run in rounds),
        "prompt_tokens_mean": statistics.fmean(run["summary"]["tokens"]["prompt"]["mean"] for run in rounds),
    }
    return row | shares("tailserve" if name == "baseline" else name, row, c, ceil, output_tokens, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="tailserve,llamacpp")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument(
        "--requests-per-stream", type=int, default=4, help="requests = max(16, this × concurrency)"
    )
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds pooled per row")
    ap.add_argument("--tailserve-args", default="", help="extra flags for tailserve serve")
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, choices=list(MODELS), help="the GGUF every server serves"
    )
    ap.add_argument("--against", type=Path, help="another checkout: its tailserve joins as 'baseline'")
    args = ap.parse_args()
    gguf = str(resolve_model(args.model))
    levels = [int(c) for c in args.concurrency.split(",")]
    ceil = measure()
    print("ceilings", ceil, flush=True)
    names = args.peers.split(",") + (["baseline"] if args.against else [])
    extra = args.tailserve_args.split()
    runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in names}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name in names:
            cmd, log = server_cmd(name, gguf, extra, args.model, args.against), RESULTS / f"{name}.log"
            urls[name] = stack.enter_context(serving(cmd, PORTS[name], log))
        for c in levels:
            n = max(16, args.requests_per_stream * c)
            for rnd in range(args.rounds):
                for name in round_order(names, rnd):
                    out = RESULTS / f"peers-{name}-c{c}-r{rnd}"
                    run = closed_loop(urls[name], out, "chat", c, n, args.output_tokens, rnd)
                    runs[name][c].append(run)
                    t = run["summary"]["latency"]["ttft_s"]
                    print(f"{name} c={c} r{rnd}: TTFT p50 {t['p50']:.3f}, p99 {t['p99']:.3f} s", flush=True)
    results = {
        name: {c: pooled(rounds, c, name, ceil, args.output_tokens, args.model) for c, rounds in by_c.items()}
        for name, by_c in runs.items()
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    # A capped tier's run goes beside the machine's own (BENCHMARKS.md quotes both).
    out = "peers.json" if ceil["tier"] == kernels.runnable_tiers()[0] else f"peers-{ceil['tier']}.json"
    if args.model != DEFAULT_MODEL:
        out = out.replace("peers", f"peers-{args.model}")
    (RECORDED / out).write_text(json.dumps({"ceilings": ceil, **results}, indent=2))
    cmd = f"python benchmarks/peers.py --peers {args.peers} --rounds {args.rounds} --model {args.model}"
    cmd += f" --against {args.against}" if args.against else ""
    print(header("tailserve vs peers, chat workload", cmd))
    print(
        f"llama.cpp build: {os.environ.get('LLAMA_CPU_TIER', 'native')}; "
        f"vLLM tier: {os.environ.get('VLLM_CPU_TIER', 'native')}. Ceilings (tier {ceil['tier']}): "
        f"read {ceil['read_gb_s']:.1f} GB/s, bf16 {ceil['bf16_gflop_s']:.0f} GFLOP/s, "
        f"int8 {ceil['int8_gop_s']:.0f} GOP/s.\n"
    )
    print(
        "| server | conc | ok | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | out tok/s | tok/s vs tailserve "
        "| bandwidth share | compute share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for c, r in rows.items():
            base = results.get("tailserve", {}).get(c)
            ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}x" if base else "-"
            print(
                f"| {name} | {c} | {r['ok']}/{r['requests']} | {r['ttft_p50'] * 1e3:.0f} ms | "
                f"{r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | {r['itl_p99'] * 1e3:.1f} ms | "
                f"{r['output_tok_s']:.0f} | {ratio} | {r['bandwidth_share']:.0%} | {r['compute_share']:.0%} |"
            )


if __name__ == "__main__":
    main()
