"""The per-step token budget (`--max-num-batched-tokens`) trades first-token latency against step
overhead: measured with `tailserve bench`, chat workload, closed loop, one server per budget, all up
at once and alternated round by round (median over rounds).

    .venv/bin/python benchmarks/step_budget.py [--budgets 128,256,512] [--concurrency 8,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

from harness import RECORDED, RESULTS, closed_loop, header, pct, serving_all, tailserve_cmd

PORT = 8140


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="128,256,512")
    ap.add_argument("--concurrency", default="8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-tokens", type=int, default=64)
    args = ap.parse_args()
    budgets = args.budgets.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {b: tailserve_cmd(None, "--max-num-batched-tokens", b) for b in budgets}
    samples: dict[tuple[str, int], list[dict]] = {}
    with serving_all(servers, PORT, RESULTS / "budget") as urls:
        for rnd in range(args.rounds):
            for c in levels:
                for b in budgets:
                    out = RESULTS / f"budget-{b}-c{c}-r{rnd}"
                    run = closed_loop(urls[b], out, "chat", c, 4 * c, args.output_tokens, rnd)
                    r = {
                        "ttft_p50": pct(run, "ttft_s", "p50"),
                        "ttft_p99": pct(run, "ttft_s", "p99"),
                        "itl_p99": pct(run, "itl_s", "p99"),
                        "output_tok_s": run["summary"]["throughput"]["output_tok_per_s"],
                    }
                    samples.setdefault((b, c), []).append(r)
                    print(b, c, rnd, r, flush=True)
    results = {
        f"{b}@{c}": {k: statistics.median(r[k] for r in rs) for k in rs[0]} for (b, c), rs in samples.items()
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "step_budget.json").write_text(json.dumps(results, indent=2))
    print(header("Step token budget", "python benchmarks/step_budget.py"))
    print("| conc | budget | TTFT p50 | TTFT p99 | ITL p99 | out tok/s |\n|---|---|---|---|---|---|")
    for c in levels:
        for b in budgets:
            r = results[f"{b}@{c}"]
            print(
                f"| {c} | {b} | {r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | "
                f"{r['itl_p99'] * 1e3:.0f} ms | {r['output_tok_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
