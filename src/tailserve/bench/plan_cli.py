"""`tailserve plan --sweep bench.json --peak-rps R --prompt-tokens P --output-tokens O --slo-ttft T
--slo-tpot T [--utilization 0.8] [--out DIR]`: the capacity worksheet (bench/plan.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tailserve.bench.cli import _seconds


def _plan(args: argparse.Namespace) -> int:
    from tailserve.bench.plan import Demand, plan, read_sweep, write_worksheet

    sweep = read_sweep(json.loads(Path(args.sweep).read_text()))
    demand = Demand(
        args.peak_rps, args.prompt_tokens, args.output_tokens, args.slo_ttft, args.slo_tpot, args.utilization
    )
    try:
        result = plan(sweep, demand)
    except ValueError as e:
        print(f"tailserve plan: {e}")
        return 1
    paths = write_worksheet(Path(args.out), sweep, demand, result, args.sweep)
    print(
        f"{result.replicas} replicas for {demand.peak_rps:g} req/s: {result.capacity_rps:.3g} req/s each at "
        f"the SLO ({result.capacity_point}), headroom {result.headroom:.0%}, predicted p99 TTFT "
        f"{result.predicted_ttft_p99_s * 1e3:.0f} ms"
    )
    for w in result.warnings:
        print("warning:", w)
    print("wrote", ", ".join(map(str, paths)))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="replicas and headroom for a peak load, from a bench sweep")
    p.add_argument("--sweep", required=True, help="bench.json of a `tailserve bench` sweep")
    p.add_argument("--peak-rps", type=float, required=True, help="expected peak requests per second")
    p.add_argument("--prompt-tokens", type=float, required=True, help="mean prompt tokens per request")
    p.add_argument("--output-tokens", type=float, required=True, help="mean output tokens per request")
    p.add_argument("--slo-ttft", type=_seconds, required=True, help="p99 TTFT objective (500ms, 1s)")
    p.add_argument("--slo-tpot", type=_seconds, required=True, help="p99 time per output token objective")
    p.add_argument("--utilization", type=float, default=0.8, help="share of SLO capacity used at the peak")
    p.add_argument("--out", default="plan", help="folder for worksheet.md, worksheet.csv, curve.png")
    p.set_defaults(func=_plan)
    return p
