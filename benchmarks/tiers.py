"""The fused step on every CPU tier this machine runs, side by side in one process.

Each tier's kernels (layers/kernels.py) are bound to the same packed weights (FusedLlama.make_impl) and
run the same batches call by call, alternating the tiers' order each pair, so the machine's drift hits
them alike (as step_ab.py does for two revisions). Batches (seeded chat workload, default model and
precision, as `tailserve serve` runs them): a decode step at 1 and at 16 streams, and the 16-stream
burst's first step (128 prompt rows) for prefill tokens per second. Each row's shares: the bytes a
decode step reads (weights and KV) over its time against the measured read bandwidth, and its
multiply-adds against the tier's own int8 dot-product rate (ceilings.py).

    .venv/bin/python benchmarks/tiers.py [--tiers avx512-bf16,avx2] [--pairs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from ceilings import KV_BYTES_PER_TOKEN, PARAMS, WEIGHT_BYTES, measure
from harness import RECORDED, commit, cpu_name
from step_ab import batches

from tailserve.layers import kernels
from tailserve.llm import LLM


def time_tiers(runner, model, impls: dict, sched, pairs: int, ceil: dict) -> dict[str, dict]:
    """Each tier's median time on one batch, alternating the tiers' order every call."""
    tiers = list(impls)
    times: dict[str, list[float]] = {t: [] for t in tiers}
    for t in tiers:  # warm each tier's thread team and caches once
        model.impl = impls[t]
        runner.run(sched.scheduled)
    for i in range(pairs):
        for t in tiers if i % 2 == 0 else tiers[::-1]:
            model.impl = impls[t]
            time.sleep(0.006)  # an idle team parks after 3 ms: no tier spins while another runs
            t0 = time.perf_counter()
            runner.run(sched.scheduled)
            times[t].append(time.perf_counter() - t0)
    rows = sched.num_tokens
    ctx = statistics.fmean(s.seq.num_computed + s.num_new_tokens for s in sched.scheduled)
    step_bytes = WEIGHT_BYTES["tailserve"] + len(sched.scheduled) * ctx * KV_BYTES_PER_TOKEN
    out = {}
    for t in tiers:
        sec = statistics.median(times[t])
        out[t] = {
            "rows": rows,
            "median_ms": sec * 1e3,
            "tok_s": rows / sec,
            "bandwidth_share": step_bytes / sec / 1e9 / ceil[t]["read_gb_s"],
            "compute_share": 2 * PARAMS * rows / sec / 1e9 / ceil[t]["int8_gop_s"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", default=",".join(kernels.runnable_tiers()))
    ap.add_argument("--pairs", type=int, default=30, help="timed calls per tier and batch")
    args = ap.parse_args()
    tiers = args.tiers.split(",")
    llm = LLM()
    model, runner = llm.engine.runner.model, llm.engine.runner
    impls = {t: model.make_impl(model.threads, kernels.ops(t)) for t in tiers}
    default_impl = model.impl
    ceil = {t: measure(model.threads, t) for t in tiers}
    results: dict[str, dict] = {}
    for streams in (16, 1):
        for kind, sched in batches(llm, streams):  # each timed before the engine moves on
            if streams == 1 and kind == "prefill":
                continue
            name = f"{kind}-{streams}"
            results[name] = time_tiers(runner, model, impls, sched, args.pairs, ceil)
            print(name, {t: round(r["median_ms"], 2) for t, r in results[name].items()}, flush=True)
    model.impl = default_impl
    print(f"\n`benchmarks/tiers.py` — commit {commit()}, {time.strftime('%Y-%m-%d')}, {cpu_name()}\n")
    print(
        "| tier | decode 1 stream (ms) | decode 16 streams (ms) | prefill 128 rows (tok/s) | "
        "bandwidth share, 1 stream | compute share, prefill | int8 peak (Gop/s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in tiers:
        d1, d16, pf = results["decode-1"][t], results["decode-16"][t], results["prefill-16"][t]
        print(
            f"| {t} | {d1['median_ms']:.2f} | {d16['median_ms']:.2f} | {pf['tok_s']:.0f} | "
            f"{d1['bandwidth_share']:.0%} | {pf['compute_share']:.0%} | {ceil[t]['int8_gop_s']:.0f} |"
        )
    out = RECORDED / "tiers.json"
    recorded = json.loads(out.read_text()) if out.exists() else {}
    recorded[commit()] = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "ceilings": ceil, **results}
    out.write_text(json.dumps(recorded, indent=2))


if __name__ == "__main__":
    main()
