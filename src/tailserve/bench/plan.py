"""`tailserve plan`: replicas for a peak load, from a capacity sweep `tailserve bench` measured.

The sweep (`bench.json` of a `--concurrency a,b,c` or `--rate ...` run) gives, per load point, the
throughput one replica sustained and its p99 TTFT and TPOT. The plan, a pure function of that sweep and
the user's figures:

1. A point *meets the SLO* when its p99 TTFT and p99 TPOT are both within the SLOs. The replica's
   capacity is the highest request rate among such points, measured at the sweep's mean output length.
2. Requests of another output length cost in proportion to it (decode steps dominate a chat request's
   time on this engine; the prompt is prefilled in chunks beside them): capacity × sweep output tokens /
   planned output tokens. A planned prompt much longer than the sweep's is flagged, since then prefill
   is no longer the small share this assumes — measure a sweep with such prompts instead.
3. Replicas = ceil(peak RPS / (capacity × target utilization)); headroom = 1 − peak / (replicas × capacity).
4. The operating point is the load each replica carries at the peak; its p99 TTFT is read off the curve
   (linear between the measured points), and the plot shows both.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A planned prompt this many times the sweep's mean is outside what the sweep measured.
PROMPT_RANGE = 2.0


@dataclass(frozen=True)
class SweepPoint:
    label: str
    req_per_s: float
    output_tok_per_s: float
    ttft_p99_s: float
    tpot_p99_s: float


@dataclass(frozen=True)
class Sweep:
    points: list[SweepPoint]
    prompt_tokens: float  # mean over the sweep's requests
    output_tokens: float


@dataclass(frozen=True)
class Demand:
    peak_rps: float
    prompt_tokens: float
    output_tokens: float
    slo_ttft_s: float
    slo_tpot_s: float
    utilization: float = 0.8  # the share of a replica's SLO capacity planned at the peak


@dataclass(frozen=True)
class Plan:
    capacity_rps: float  # one replica, at the SLO, with the planned output length
    capacity_point: str  # the sweep point it comes from
    replicas: int
    per_replica_rps: float  # the operating point: each replica's load at the peak
    headroom: float  # 1 - peak / (replicas x capacity)
    predicted_ttft_p99_s: float
    warnings: list[str]


def read_sweep(bench_json: dict[str, Any]) -> Sweep:
    """The sweep of a `tailserve bench` result (schema tailserve-bench/1), in load order."""
    points, prompts, outputs = [], [], []
    for run in bench_json["runs"]:
        s = run["summary"]
        lat = s["latency"]
        if lat["ttft_s"] is None or lat["tpot_s"] is None:
            continue  # nothing completed at this load
        points.append(
            SweepPoint(
                run["label"],
                s["throughput"]["req_per_s"],
                s["throughput"]["output_tok_per_s"],
                lat["ttft_s"]["p99"],
                lat["tpot_s"]["p99"],
            )
        )
        prompts.append(s["tokens"]["prompt"]["mean"])
        outputs.append(s["tokens"]["output"]["mean"])
    if not points:
        raise ValueError("the sweep has no load point with completed requests")
    return Sweep(points, sum(prompts) / len(prompts), sum(outputs) / len(outputs))


def plan(sweep: Sweep, demand: Demand) -> Plan:
    """The replicas `demand` needs on the hardware `sweep` was measured on (see the module docstring)."""
    if not 0 < demand.utilization <= 1:
        raise ValueError("utilization must be in (0, 1]")
    meeting = [
        p for p in sweep.points if p.ttft_p99_s <= demand.slo_ttft_s and p.tpot_p99_s <= demand.slo_tpot_s
    ]
    if not meeting:
        raise ValueError("no load point of the sweep meets the SLO: one replica cannot serve it at any load")
    best = max(meeting, key=lambda p: p.req_per_s)
    scale = sweep.output_tokens / demand.output_tokens
    capacity = best.req_per_s * scale
    replicas = max(1, math.ceil(demand.peak_rps / (capacity * demand.utilization) - 1e-9))
    per_replica = demand.peak_rps / replicas
    warnings = []
    if demand.prompt_tokens > PROMPT_RANGE * sweep.prompt_tokens:
        warnings.append(
            f"the planned prompts ({demand.prompt_tokens:g} tokens) are over {PROMPT_RANGE:g}x the sweep's "
            f"({sweep.prompt_tokens:.0f}): measure a sweep with prompts like them"
        )
    return Plan(
        capacity_rps=capacity,
        capacity_point=best.label,
        replicas=replicas,
        per_replica_rps=per_replica,
        headroom=1 - demand.peak_rps / (replicas * capacity),
        predicted_ttft_p99_s=ttft_at(sweep, per_replica / scale),
        warnings=warnings,
    )


def ttft_at(sweep: Sweep, req_per_s: float) -> float:
    """p99 TTFT at a throughput (sweep units), linear between measured points, flat beyond the ends."""
    pts = sorted(sweep.points, key=lambda p: p.req_per_s)
    if req_per_s <= pts[0].req_per_s:
        return pts[0].ttft_p99_s
    for a, b in itertools.pairwise(pts):
        if req_per_s <= b.req_per_s:
            f = (req_per_s - a.req_per_s) / (b.req_per_s - a.req_per_s)
            return a.ttft_p99_s + f * (b.ttft_p99_s - a.ttft_p99_s)
    return pts[-1].ttft_p99_s


def write_worksheet(out: Path, sweep: Sweep, demand: Demand, result: Plan, source: str) -> list[Path]:
    """worksheet.md, worksheet.csv and curve.png in `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    scale = sweep.output_tokens / demand.output_tokens
    rows = [
        {
            "load": p.label,
            "req_per_s": round(p.req_per_s, 4),
            "req_per_s_planned_length": round(p.req_per_s * scale, 4),
            "output_tok_per_s": round(p.output_tok_per_s, 1),
            "ttft_p99_ms": round(p.ttft_p99_s * 1e3, 1),
            "tpot_p99_ms": round(p.tpot_p99_s * 1e3, 1),
            "meets_slo": p.ttft_p99_s <= demand.slo_ttft_s and p.tpot_p99_s <= demand.slo_tpot_s,
        }
        for p in sweep.points
    ]
    csv_path = out / "worksheet.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = [
        "# Capacity worksheet",
        "",
        f"Sweep: `{source}` (mean prompt {sweep.prompt_tokens:.0f} tokens, "
        f"output {sweep.output_tokens:.0f}).",
        "",
        "| input | value |",
        "|---|---|",
        f"| peak load | {demand.peak_rps:g} req/s |",
        f"| tokens in / out per request | {demand.prompt_tokens:g} / {demand.output_tokens:g} |",
        f"| SLO | p99 TTFT ≤ {demand.slo_ttft_s * 1e3:g} ms, p99 TPOT ≤ {demand.slo_tpot_s * 1e3:g} ms |",
        f"| planned utilization at peak | {demand.utilization:.0%} |",
        "",
        "| load | req/s | req/s at planned length | output tok/s | p99 TTFT ms | p99 TPOT ms | meets SLO |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['load']} | {r['req_per_s']:g} | {r['req_per_s_planned_length']:g} "
            f"| {r['output_tok_per_s']:g} | {r['ttft_p99_ms']:g} | {r['tpot_p99_ms']:g} "
            f"| {'yes' if r['meets_slo'] else 'no'} |"
            for r in rows
        ),
        "",
        f"- capacity of one replica at the SLO: **{result.capacity_rps:.3g} req/s** "
        f"({result.capacity_point}, scaled by output length "
        f"{sweep.output_tokens:.0f}/{demand.output_tokens:g})",
        f"- replicas: **{result.replicas}** = ceil({demand.peak_rps:g} / ({result.capacity_rps:.3g} × "
        f"{demand.utilization:g}))",
        f"- operating point: {result.per_replica_rps:.3g} req/s per replica, predicted p99 TTFT "
        f"{result.predicted_ttft_p99_s * 1e3:.0f} ms; headroom at peak **{result.headroom:.0%}**",
        f"- replica-hours per day at that size: {result.replicas * 24}",
        *(f"- warning: {w}" for w in result.warnings),
        "",
        "![capacity curve](curve.png)",
        "",
    ]
    md_path = out / "worksheet.md"
    md_path.write_text("\n".join(md))
    (out / "plan.json").write_text(json.dumps({"demand": asdict(demand), "plan": asdict(result)}, indent=2))
    return [md_path, csv_path, _plot(out / "curve.png", sweep, demand, result)]


def _plot(path: Path, sweep: Sweep, demand: Demand, result: Plan) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = sweep.output_tokens / demand.output_tokens
    pts = sorted(sweep.points, key=lambda p: p.req_per_s)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.req_per_s * scale for p in pts], [p.ttft_p99_s * 1e3 for p in pts], "o-", label="p99 TTFT")
    ax.axhline(demand.slo_ttft_s * 1e3, color="red", ls="--", label="SLO")
    ax.axvline(result.capacity_rps, color="gray", ls=":", label="capacity at SLO")
    ax.plot(
        [result.per_replica_rps], [result.predicted_ttft_p99_s * 1e3], "k*", ms=14, label="operating point"
    )
    ax.set_xlabel("req/s per replica (planned output length)")
    ax.set_ylabel("p99 TTFT (ms)")
    ax.set_title(f"{result.replicas} replicas for {demand.peak_rps:g} req/s, headroom {result.headroom:.0%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
