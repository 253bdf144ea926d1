"""When to hedge (The Tail at Scale, Dean & Barroso 2013): a second attempt on another backend once
the first has given no first token for longer than the backend usually takes.

The delay is a set value, or the `quantile` (p95 by default) of the TTFTs this backend was seen to
give for this model: a request past it is in the backend's slowest 5 %, where a fresh attempt elsewhere
is likely to beat it. Hedges are capped twice, so they cannot become the load that makes the tail:
a budget (at most `max_share` of the requests seen lately), and the target's load (no hedge onto a
backend already holding `max_load` requests or more). Pure: times and loads are passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HedgePolicy:
    delay: float | None = None  # seconds; None: the backend's observed `quantile` of TTFT
    quantile: float = 0.95
    min_samples: int = 20  # observed TTFTs needed before the quantile is trusted (no hedge before)
    max_share: float = 0.05  # hedges ≤ this share of the requests within `window`
    window: float = 10.0  # seconds
    max_load: float = 4.0  # no hedge onto a backend whose load (in flight + queue) is at least this

    def __post_init__(self) -> None:
        if self.delay is not None and self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"max_share must be in [0, 1], got {self.max_share}")


@dataclass
class TtftWindow:
    """The last `size` TTFTs of one backend for one model (and one of stream / whole answer)."""

    size: int = 200
    _samples: deque[float] = field(default_factory=deque)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        if len(self._samples) > self.size:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float) -> float | None:
        """The nearest-rank `q` quantile, or None with no samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def hedge_delay(policy: HedgePolicy, observed: TtftWindow | None) -> float | None:
    """Seconds to wait for a first token before hedging; None: do not hedge (too few samples yet)."""
    if policy.delay is not None:
        return policy.delay
    if observed is None or len(observed) < policy.min_samples:
        return None
    return observed.quantile(policy.quantile)


@dataclass
class HedgeBudget:
    """Hedges allowed within the last `window` seconds: at most `ratio` × the requests seen. No floor:
    at 5 % a hedge needs 20 requests behind it, so a burst of slow requests cannot double the load."""

    ratio: float
    window: float = 10.0
    _requests: deque[float] = field(default_factory=deque)
    _hedges: deque[float] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._hedges):
            while q and now - q[0] > self.window:
                q.popleft()

    def on_request(self, now: float) -> None:
        self._trim(now)
        self._requests.append(now)

    def try_hedge(self, now: float) -> bool:
        """Spend one hedge if the share allows it."""
        self._trim(now)
        if len(self._hedges) + 1 > self.ratio * len(self._requests):
            return False
        self._hedges.append(now)
        return True


def may_hedge_onto(policy: HedgePolicy, target_load: float) -> bool:
    """Whether the backend a hedge would go to is loaded lightly enough to take it."""
    return target_load < policy.max_load
