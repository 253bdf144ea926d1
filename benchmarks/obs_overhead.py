"""What observability costs: output tok/s at concurrency 16 with metrics, tracing and the request log on,
against the same server with all three off, in one run.

Both servers run side by side (the idle one costs nothing) and take turns, A B B A …, so drift in the
machine's load falls on both alike. "On" is the default `serve` (metrics and the JSON request log) plus
`--otel-exporter console`, its spans written to the server's log file; "off" is `--no-metrics
--no-request-log` without tracing.

    .venv/bin/python benchmarks/obs_overhead.py [--rounds 3] [--requests 64] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

from harness import RECORDED, RESULTS, bench, header, pct, serving, tailserve_cmd

CONFIGS = {
    "off": (8111, ("--no-metrics", "--no-request-log")),
    "on": (8112, ("--otel-exporter", "console")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs per configuration")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    common = ["--workload", "chat", "--seed", "0", "--no-plots", "--warmup", "4"]
    common += ["--output-tokens", str(args.output_tokens), "--requests", str(args.requests)]
    common += ["--concurrency", str(args.concurrency)]
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(
                serving(
                    tailserve_cmd(port, "--max-num-seqs", str(args.concurrency), *flags),
                    port,
                    RESULTS / f"obs_overhead-{name}.log",
                )
            )
            for name, (port, flags) in CONFIGS.items()
        }
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for name in order:
                out = RESULTS / f"obs_overhead-{name}-{r}"
                run = bench(urls[name], out, *common)
                s = run["summary"]
                runs[name].append(
                    {
                        "output_tok_per_s": s["throughput"]["output_tok_per_s"],
                        "ttft_p50_s": pct(run, "ttft_s", "p50"),
                        "ttft_p99_s": pct(run, "ttft_s", "p99"),
                        "itl_p50_s": pct(run, "itl_s", "p50"),
                        "ok": s["counts"]["ok"],
                    }
                )
                print(f"round {r} {name}: {runs[name][-1]['output_tok_per_s']:.1f} output tok/s", flush=True)
    summary = {
        name: {
            key: statistics.median(x[key] for x in rs)
            for key in ("output_tok_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s")
        }
        for name, rs in runs.items()
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    record = {"config": vars(args), "runs": runs, "median": summary}
    (RECORDED / "obs_overhead.json").write_text(json.dumps(record, indent=2))
    print(header("Observability overhead", "python benchmarks/obs_overhead.py"))
    off, on = summary["off"], summary["on"]
    n, out = args.requests, args.output_tokens
    print(f"medians of {args.rounds} runs each; {n} chat requests of {out} output tokens\n")
    print("| metric | all off | metrics + tracing + log | change |\n|---|---|---|---|")
    a, b = off["output_tok_per_s"], on["output_tok_per_s"]
    print(f"| output tok/s, concurrency {args.concurrency} | {a:.1f} | {b:.1f} | {b / a - 1:+.1%} |")
    for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("itl_p50_s", "ITL p50")):
        a, b = off[key] * 1e3, on[key] * 1e3
        print(f"| {label} | {a:.1f} ms | {b:.1f} ms | {b - a:+.1f} ms |")
    per_run = ", ".join(f"{x['output_tok_per_s']:.1f}" for x in runs["off"])
    print(f"\nper run, off: {per_run}; on: " + ", ".join(f"{x['output_tok_per_s']:.1f}" for x in runs["on"]))
    paired = statistics.median(
        b["output_tok_per_s"] / a["output_tok_per_s"] for a, b in zip(runs["off"], runs["on"])
    )
    print(f"median of the per-round on/off ratios: {paired - 1:+.1%}")


if __name__ == "__main__":
    main()
