"""The server's own view from its Prometheus `/metrics`, scraped before and after a run.

Names are matched by suffix after any `prefix:` (tailserve:, vllm:, llamacpp:), so one parser
serves every server that follows the field's naming. Histogram quantiles are estimated from the
bucket deltas the way Prometheus' histogram_quantile does (linear within a bucket), so they are only
as fine as the buckets; the mean (sum/count) is exact, which is why the TTFT check uses it.
"""

from __future__ import annotations

import math

import httpx

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TTFT_DISAGREEMENT = 0.10  # flag when server and client mean TTFT differ by more than this share


async def scrape(base_url: str, api_key: str | None = None) -> Samples | None:
    """Every sample of GET /metrics, or None where the server has no (parseable) metrics."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
            resp = await c.get(base_url + "/metrics", headers=headers)
        if resp.status_code != 200:
            return None
        return parse(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


def parse(text: str) -> Samples:
    """Flatten the exposition text to {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith(":" + suffix)


def _sum(samples: Samples, suffix: str) -> float | None:
    vals = [v for (name, _), v in samples.items() if _matches(name, suffix)]
    return sum(vals) if vals else None


def _delta(before: Samples, after: Samples, suffix: str) -> float | None:
    a = _sum(after, suffix)
    return None if a is None else a - (_sum(before, suffix) or 0.0)


def _buckets(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) deltas of a histogram, summed over its other labels."""
    acc: dict[float, float] = {}
    for (n, labels), v in after.items():
        if not _matches(n, name + "_bucket"):
            continue
        le = float(dict(labels)["le"])
        acc[le] = acc.get(le, 0.0) + v - before.get((n, labels), 0.0)
    return sorted(acc.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: find the bucket holding the q-th observation, interpolate linearly."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return prev_le


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def server_view(before: Samples, after: Samples, client_ttft_mean: float | None) -> dict:
    """The server's numbers for the run window, beside the client's mean TTFT."""
    prefixes = sorted({n.split(":", 1)[0] + ":" for (n, _) in after if ":" in n})
    view: dict = {
        "metric_prefixes": prefixes,
        "prefix_cache_hit_rate": _ratio(
            _delta(before, after, "prefix_cache_hits_total"),
            _delta(before, after, "prefix_cache_queries_total"),
        ),
        "spec_decode_acceptance_rate": _ratio(
            _delta(before, after, "spec_decode_num_accepted_tokens_total"),
            _delta(before, after, "spec_decode_num_draft_tokens_total"),
        ),
    }
    for key, hist in (
        ("ttft", "time_to_first_token_seconds"),
        ("itl", "inter_token_latency_seconds"),
        ("e2e", "e2e_request_latency_seconds"),
        ("queue", "request_queue_time_seconds"),
    ):
        count = _delta(before, after, hist + "_count")
        buckets = _buckets(before, after, hist)
        view[f"{key}_count"] = count
        view[f"{key}_mean_s"] = _ratio(_delta(before, after, hist + "_sum"), count)
        view[f"{key}_p50_s"] = histogram_quantile(0.5, buckets)
        view[f"{key}_p99_s"] = histogram_quantile(0.99, buckets)
    server_ttft = view["ttft_mean_s"]
    view["client_ttft_mean_s"] = client_ttft_mean
    gap = None
    if server_ttft is not None and client_ttft_mean:
        gap = (client_ttft_mean - server_ttft) / client_ttft_mean
    view["ttft_disagreement"] = gap
    view["ttft_disagrees"] = gap is not None and abs(gap) > TTFT_DISAGREEMENT
    view["counters"] = {
        _key(n, labels): after[(n, labels)] - before.get((n, labels), 0.0)
        for (n, labels) in after
        if n.endswith("_total") and after[(n, labels)] != before.get((n, labels), 0.0)
    }
    return view


def _key(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
