""" "Where the time went": per request (each stage's allowance, time used, outcome and share of the
end-to-end time) and aggregated over a run (per stage p50/p95/p99, overruns, share of all e2e time;
the table that shows whether retrieval or inference is the problem). Pure functions of records."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from tailserve.bench.stats import percentile
from tailserve.pipeline.record import RequestRecord


def request_report(rec: RequestRecord) -> dict[str, Any]:
    """One request: its budget, e2e time, and each stage in the order it started."""
    e2e = rec.e2e_s
    rows = [
        {
            "stage": s.name,
            "start_ms": round((s.start - rec.start) * 1e3, 2),
            "allowance_ms": round(s.allowance_s * 1e3, 2),
            "used_ms": round(s.elapsed_s * 1e3, 2),
            "share": round(s.elapsed_s / e2e, 4) if e2e > 0 else None,
            "outcome": s.outcome,
            "overrun": s.overrun,
            "error": s.error,
            "notes": list(s.notes),
        }
        for s in sorted(rec.stages, key=lambda s: s.start)
    ]
    return {
        "budget_ms": round(rec.budget_s * 1e3, 2),
        "e2e_ms": round(e2e * 1e3, 2),
        "degraded": rec.degraded,
        "stages": rows,
    }


def _ms(xs: Sequence[float], q: float) -> float:
    return round(percentile(xs, q) * 1e3, 2)


def aggregate(records: Iterable[RequestRecord]) -> dict[str, Any]:
    """Every stage over many requests. `share` is the stage's summed time over the summed e2e time
    (parallel stages can add to more than 1); `overruns` counts stages answered by their policy
    because of time, `fallbacks` all answered by their policy."""
    recs = list(records)
    e2e = sorted(r.e2e_s for r in recs)
    total = sum(e2e)
    by_stage: dict[str, list[float]] = {}
    overruns: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for r in recs:
        for s in r.stages:
            by_stage.setdefault(s.name, []).append(s.elapsed_s)
            overruns[s.name] = overruns.get(s.name, 0) + s.overrun
            fallbacks[s.name] = fallbacks.get(s.name, 0) + (s.outcome != "ok")
    stages = []
    for name, xs in by_stage.items():
        xs.sort()
        stages.append(
            {
                "stage": name,
                "n": len(xs),
                "p50_ms": _ms(xs, 50),
                "p95_ms": _ms(xs, 95),
                "p99_ms": _ms(xs, 99),
                "share": round(sum(xs) / total, 4) if total > 0 else None,
                "overruns": overruns[name],
                "fallbacks": fallbacks[name],
            }
        )
    return {
        "requests": len(recs),
        "degraded_share": round(sum(r.degraded for r in recs) / len(recs), 4) if recs else None,
        "e2e": {"p50_ms": _ms(e2e, 50), "p95_ms": _ms(e2e, 95), "p99_ms": _ms(e2e, 99)} if e2e else None,
        "stages": stages,
    }


class RunReport:
    """The last `keep` requests' records, for the aggregated report of a running app."""

    def __init__(self, keep: int = 10_000) -> None:
        self.records: deque[RequestRecord] = deque(maxlen=keep)

    def add(self, rec: RequestRecord) -> None:
        self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()

    def summary(self) -> dict[str, Any]:
        return aggregate(self.records)
