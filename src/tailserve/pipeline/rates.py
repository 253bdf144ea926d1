"""The server's measured speeds, read from its Prometheus `/metrics` (what compression prices with).

tailserve exposes no rate gauge, but its counters give one exactly: prompt tokens prefilled less
those found in the prefix cache, over the summed per-request prefill time
(`request_prefill_time_seconds`, first scheduled to first token), and decode time per output token
from `request_time_per_output_token_seconds`. Taken as the difference of two scrapes, so the rate
follows the server's current load rather than its lifetime average.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from tailserve.bench.prom import Samples, parse


def _total(samples: Samples, suffix: str) -> float:
    return sum(v for (name, _), v in samples.items() if name == suffix or name.endswith(":" + suffix))


@dataclass(frozen=True)
class Rates:
    prefill_tokens_per_s: float | None  # None until the server has prefilled something
    s_per_output_token: float | None


def rates(before: Samples, after: Samples) -> Rates:
    """Speeds over the window between two scrapes (`before` may be empty: since the server started)."""

    def delta(suffix: str) -> float:
        return _total(after, suffix) - _total(before, suffix)

    computed = delta("prompt_tokens_total") - delta("prefix_cache_hits_total")
    prefill_s = delta("request_prefill_time_seconds_sum")
    tpot_n = delta("request_time_per_output_token_seconds_count")
    return Rates(
        computed / prefill_s if prefill_s > 0 and computed > 0 else None,
        delta("request_time_per_output_token_seconds_sum") / tpot_n if tpot_n > 0 else None,
    )


class RateReader:
    """Scrapes a server at most every `refresh_s` and keeps the last known rates (a window of two
    scrapes; the first window starts at the server's start)."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, refresh_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http  # shared with the LLM client: no new connection (or TLS context) per scrape
        self.refresh_s = refresh_s
        self._prev: Samples = {}
        self._at = -float("inf")
        self.current = Rates(None, None)

    async def get(self) -> Rates:
        now = time.monotonic()
        if now - self._at >= self.refresh_s:
            self._at = now
            samples = await self._scrape()
            if samples is not None:
                fresh = rates(self._prev, samples)
                self.current = Rates(
                    fresh.prefill_tokens_per_s or self.current.prefill_tokens_per_s,
                    fresh.s_per_output_token or self.current.s_per_output_token,
                )
                self._prev = samples
        return self.current

    async def _scrape(self) -> Samples | None:
        try:
            resp = await self.http.get(self.base_url + "/metrics", timeout=2.0)
            return parse(resp.text) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
