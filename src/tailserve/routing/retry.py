"""When to retry and how long to wait: exponential backoff with full jitter, and a retry budget.

Full jitter (a uniform draw from 0 to the exponential cap) spreads the retries of many clients that
failed together, so they do not come back in lockstep. The budget bounds retries to a share of the
requests seen lately, so an outage cannot multiply the load on what is left (retries live in one
layer only: the gateway).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def retryable_status(status: int) -> bool:
    """Statuses that say "try elsewhere or later", not "your request is wrong"."""
    return status in RETRY_STATUSES or status >= 500


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry `attempt` (1 for the first): uniform in [0, min(cap, base·2^(attempt-1))]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** max(0, attempt - 1)))


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (the delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


@dataclass
class RetryBudget:
    """Retries allowed within the last `window` seconds: `min_retries` plus `ratio` × requests seen."""

    ratio: float = 0.2
    min_retries: int = 10
    window: float = 10.0
    _requests: deque[float] = field(default_factory=deque)
    _retries: deque[float] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and now - q[0] > self.window:
                q.popleft()

    def on_request(self, now: float) -> None:
        self._trim(now)
        self._requests.append(now)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget has one left."""
        self._trim(now)
        if len(self._retries) >= self.min_retries + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True
