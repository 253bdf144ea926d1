"""tailserve against its peers (llama.cpp server, vLLM CPU) on the same model and seeded chat workload.

Each server is started in turn on 127.0.0.1, loaded with `tailserve bench --workload chat` at each
concurrency (64 output tokens, ignore_eos, greedy), then stopped. Prints a markdown table with ratios
against tailserve and each row's share of the machine's bandwidth and compute ceilings (ceilings.py,
measured first), and writes benchmarks/recorded/peers.json.

    .venv/bin/python benchmarks/peers.py [--peers tailserve,llamacpp,vllm] [--concurrency 1,8,16]
"""

from __future__ import annotations

import argparse
import json

from ceilings import measure, shares
from harness import PEERS, RECORDED, RESULTS, closed_loop, header, pct, serving, tailserve_cmd

from tailserve.models.loader import resolve_model

PORTS = {"tailserve": 8100, "llamacpp": 8101, "vllm": 8102}


def server_cmd(name: str, gguf: str, extra: list[str]) -> list[str]:
    port = str(PORTS[name])
    if name == "tailserve":
        return tailserve_cmd(PORTS[name], *extra)
    if name == "llamacpp":
        return ["bash", str(PEERS / "llama_server.sh"), "serve", gguf, port, "16"]
    return ["bash", str(PEERS / "vllm_cpu.sh"), "serve", gguf, port]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="tailserve,llamacpp")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument(
        "--requests-per-stream", type=int, default=4, help="requests = max(16, this × concurrency)"
    )
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--tailserve-args", default="", help="extra flags for tailserve serve")
    args = ap.parse_args()
    gguf = str(resolve_model("smollm2-135m-instruct"))
    levels = [int(c) for c in args.concurrency.split(",")]
    ceil = measure()
    print("ceilings", ceil, flush=True)
    results: dict[str, dict[int, dict]] = {}
    for name in args.peers.split(","):
        cmd = server_cmd(name, gguf, args.tailserve_args.split())
        with serving(cmd, PORTS[name], RESULTS / f"{name}.log") as url:
            for c in levels:
                n = max(16, args.requests_per_stream * c)
                out = RESULTS / f"peers-{name}-c{c}"
                run = closed_loop(url, out, "chat", c, n, args.output_tokens, 0)
                results.setdefault(name, {})[c] = {
                    "ok": run["summary"]["counts"]["ok"],
                    "requests": n,
                    "ttft_p50": pct(run, "ttft_s", "p50"),
                    "ttft_p99": pct(run, "ttft_s", "p99"),
                    "itl_p50": pct(run, "itl_s", "p50"),
                    "itl_p99": pct(run, "itl_s", "p99"),
                    "output_tok_s": run["summary"]["throughput"]["output_tok_per_s"],
                    "prompt_tokens_mean": run["summary"]["tokens"]["prompt"]["mean"],
                }
                results[name][c].update(shares(name, results[name][c], c, ceil, args.output_tokens))
                print(name, c, results[name][c], flush=True)
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "peers.json").write_text(json.dumps({"ceilings": ceil, **results}, indent=2))
    print(header("tailserve vs peers, chat workload", "python benchmarks/peers.py --peers " + args.peers))
    print(
        f"Ceilings: read {ceil['read_gb_s']:.1f} GB/s, bf16 {ceil['bf16_gflop_s']:.0f} GFLOP/s, "
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
