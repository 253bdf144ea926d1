"""Spawned backends on CPU shares of their own against each on every core (issue 16's `spawn:`).

`tailserve gateway` with one `spawn:` entry of `--replicas` backends, started afresh each round in
two settings, alternating: `split` (the default: each replica held to a slice of its own of the CPUs,
its step team that size) and `all-cores` (`--num-threads` = every CPU in each replica's args, which is
what each got before: a team per replica on every core). Each round: one unrecorded pass of the
seeded chat workload, then the same requests measured at `--concurrency`. Reported, pooled over
rounds: output tokens/s, TTFT and ITL p50/p99.

    .venv/bin/python benchmarks/spawn_cpus.py [--rounds 3] [--replicas 2] [--requests 96]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from harness import RECORDED, RESULTS, closed_loop, header, quantile, serving

MODEL = "smollm2-135m-instruct"
PORT = 8160


def config(path: str, replicas: int, threads: int | None) -> str:
    args = ["--max-num-seqs", "16"] + (["--num-threads", str(threads)] if threads else [])
    spec = {"port": PORT, "models": {MODEL: {"backends": [{"spawn": {"replicas": replicas, "args": args}}]}}}
    with open(path, "w") as f:
        json.dump(spec, f)  # YAML is a superset of JSON
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {
        "split": config(str(RESULTS / "spawn-split.yaml"), args.replicas, None),
        "all-cores": config(str(RESULTS / "spawn-all.yaml"), args.replicas, len(os.sched_getaffinity(0))),
    }
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name in list(settings) if r % 2 == 0 else list(settings)[::-1]:
            cmd = [sys.executable, "-m", "tailserve.cli", "gateway", "--config", settings[name]]
            with serving(cmd, PORT, RESULTS / f"spawn-{name}.log") as url:
                load = ("chat", args.concurrency, args.requests, args.output_tokens, r, "--model", MODEL)
                closed_loop(url, RESULTS / f"spawn_cpus-warm-{name}-r{r}", *load)
                run = closed_loop(url, RESULTS / f"spawn_cpus-{name}-r{r}", *load)
            runs[name].append(run)
            print(f"round {r} {name}: ok {run['summary']['counts']['ok']}/{args.requests}", flush=True)
    summary = {}
    for name, rs in runs.items():
        reqs = [q for run in rs for q in run["requests"] if q["status"] == "ok"]
        ttft = [q["ttft_s"] for q in reqs]
        itl = [x for q in reqs for x in q["itl_s"]]
        tok_s = [run["summary"]["throughput"]["output_tok_per_s"] for run in rs]
        summary[name] = {
            "output_tok_s": sum(tok_s) / len(tok_s),
            "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p99_s": quantile(ttft, 0.99),
            "itl_p50_s": quantile(itl, 0.5),
            "itl_p99_s": quantile(itl, 0.99),
            "ok": len(reqs),
        }
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / f"spawn_cpus{'-' + args.tag if args.tag else ''}.json").write_text(
        json.dumps({"config": vars(args), "summary": summary}, indent=2)
    )
    print(header("Spawned backends: split CPUs vs all cores each", "python benchmarks/spawn_cpus.py"))
    print("| setting | ok | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        ms = [f"{s[k] * 1e3:.1f} ms" for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")]
        print(f"| {name} | {s['ok']} | {s['output_tok_s']:.0f} | " + " | ".join(ms) + " |")


if __name__ == "__main__":
    main()
