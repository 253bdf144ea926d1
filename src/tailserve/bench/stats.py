"""Percentiles, prompt-length buckets, goodput and capacity from request records.

Which requests count where:
- *measured* requests are the well-behaved ones (tags other than disconnect, oversized and
  slowreader) that the duration cap did not cancel; latency distributions, buckets and goodput are
  over them, so the unhappy clients' own numbers never pollute the picture of everyone else;
- every request, unhappy ones included, appears in the counts and in the per-tag breakdown.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tailserve.bench.client import RequestRecord

PERCENTILES = (50, 90, 95, 99)
UNHAPPY_TAGS = ("disconnect", "oversized", "slowreader")
EXPECTED_REJECTIONS = (400, 413)  # what an oversized prompt should get
LEN_EDGES = (128, 512, 1024, 2048)  # prompt-length bucket edges, in tokens


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None means not set."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def is_set(self) -> bool:
        return any(x is not None for x in (self.ttft, self.tpot, self.e2e))

    def met(self, r: RequestRecord) -> bool:
        """A request meets the SLO when it completed and every set objective holds."""
        if r.status != "ok":
            return False
        checks = ((self.ttft, r.ttft), (self.tpot, r.tpot), (self.e2e, r.e2e))
        return all(lim is None or (val is not None and val <= lim) for lim, val in checks)

    def to_json(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft, "tpot_s": self.tpot, "e2e_s": self.e2e}


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def dist(xs: Iterable[float | None]) -> dict[str, float] | None:
    """n, mean, min, max and the reported percentiles of the values that are not None."""
    vals = sorted(x for x in xs if x is not None)
    if not vals:
        return None
    d = {"n": len(vals), "mean": sum(vals) / len(vals), "min": vals[0], "max": vals[-1]}
    d.update({f"p{p}": percentile(vals, p) for p in PERCENTILES})
    return d


def bucket_of(tokens: int) -> str:
    lo = 0
    for edge in LEN_EDGES:
        if tokens < edge:
            return f"{lo}-{edge - 1}"
        lo = edge
    return f">={lo}"


def prompt_tokens(r: RequestRecord) -> int:
    """The server's count where it gave one, else the estimate."""
    return r.prompt_tokens if r.prompt_tokens is not None else r.approx_prompt_tokens


def is_measured(r: RequestRecord) -> bool:
    return r.tag not in UNHAPPY_TAGS and r.status != "cancelled"


def latency(records: Sequence[RequestRecord]) -> dict[str, dict[str, float] | None]:
    """TTFT, ITL (every gap of every request: token-weighted), TPOT and e2e distributions."""
    return {
        "ttft_s": dist(r.ttft for r in records),
        "itl_s": dist(g for r in records for g in r.itl),
        "tpot_s": dist(r.tpot for r in records),
        "e2e_s": dist(r.e2e for r in records),
    }


def _outcome(r: RequestRecord) -> str:
    """The key a request is counted under in errors_by_status: the HTTP status, else the error's
    kind (errors read "kind: detail"), else the status (timeout, cancelled)."""
    if r.http_status is not None and r.http_status != 200:
        return str(r.http_status)
    return (r.error or r.status).split(":", 1)[0] if r.status == "error" else r.status


def summarize(records: Sequence[RequestRecord], wall_s: float, slo: SLO, not_sent: int = 0) -> dict:
    """Everything the table, the JSON and the plots report about one run."""
    measured = [r for r in records if is_measured(r)]
    ok = [r for r in measured if r.status == "ok"]
    expected = [r for r in records if r.tag == "oversized" and r.http_status in EXPECTED_REJECTIONS]
    statuses = Counter(r.status for r in records)
    failed = statuses["error"] + statuses["timeout"] - len(expected)
    wall = max(wall_s, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in records if r.status != "cancelled")
    in_tokens = sum(prompt_tokens(r) for r in records if r.status in ("ok", "disconnected"))
    by_len: dict[str, list[RequestRecord]] = {}
    for r in sorted(ok, key=prompt_tokens):
        by_len.setdefault(bucket_of(prompt_tokens(r)), []).append(r)
    by_tag: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_tag.setdefault(r.tag, []).append(r)
    summary: dict = {
        "counts": {
            "sent": len(records),
            "not_sent": not_sent,
            "measured": len(measured),
            "ok": statuses["ok"],
            "shed": statuses["shed"],
            "failed": failed,
            "timeout": statuses["timeout"],
            "disconnected": statuses["disconnected"],
            "rejected_as_expected": len(expected),
            "cancelled": statuses["cancelled"],
        },
        "errors_by_status": dict(
            Counter(_outcome(r) for r in records if r.status not in ("ok", "disconnected"))
        ),
        "wall_s": wall_s,
        "throughput": {
            "req_per_s": statuses["ok"] / wall,
            "output_tok_per_s": out_tokens / wall,
            "input_tok_per_s": in_tokens / wall,
        },
        "latency": latency(ok),
        "tokens": {
            "prompt": dist(float(prompt_tokens(r)) for r in ok),
            "output": dist(float(r.output_tokens or 0) for r in ok),
            "source": dict(Counter(r.token_source for r in records if r.status in ("ok", "disconnected"))),
            # requests whose events carried several tokens: their ITL is per event, not per token
            "multi_token_events": sum(1 for r in ok if (r.output_tokens or 0) > len(r.token_times) > 0),
        },
        "by_prompt_len": {k: {"n": len(v), **latency(v)} for k, v in by_len.items()},
        "by_tag": {
            k: {
                "n": len(v),
                "status": dict(Counter(r.status for r in v)),
                **latency([r for r in v if r.status in ("ok", "disconnected")]),
            }
            for k, v in sorted(by_tag.items())
        },
        "goodput": None,
    }
    if slo.is_set():
        met = sum(1 for r in measured if slo.met(r))
        summary["goodput"] = {
            "slo": slo.to_json(),
            "met": met,
            "share": met / len(measured) if measured else 0.0,
            "req_per_s": met / wall,
        }
    return summary


def capacity(points: Sequence[tuple[float, dict]], attainment: float) -> dict | None:
    """The highest load whose goodput share reaches `attainment`, from (load, summary) pairs.

    Loads are scanned upward and the scan stops at the first miss, so a lucky point beyond a
    failing one does not count.
    """
    if not points or points[0][1]["goodput"] is None:
        return None
    best = None
    first_miss = None
    for load, s in sorted(points, key=lambda p: p[0]):
        if s["goodput"]["share"] >= attainment:
            best = load
        else:
            first_miss = load
            break
    return {"attainment": attainment, "max_load_meeting_slo": best, "first_load_missing_slo": first_miss}
