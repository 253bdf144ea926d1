"""What the router knows of each backend: its share (weight) and cap, the requests in flight to it,
the load it reports itself (queue, and predicted TTFT with its time), when it asked us to back off
(Retry-After), and its circuit breaker.

In-flight is counted by leases: `acquire` returns a `Lease` whose `release` is idempotent, and callers
release it in a `finally`, so every path (success, error, client gone, timeout, hedge loser) gives the
slot back and the counts cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tailserve.routing.breaker import Breaker, BreakerConfig


@dataclass
class Backend:
    name: str  # unique within a model's pool (the gateway uses the URL)
    weight: float = 1.0  # its share of traffic relative to the others
    max_concurrency: int | None = None  # in-flight cap; None: no cap
    breaker: Breaker = field(default_factory=Breaker)
    in_flight: int = 0
    reported_waiting: float = 0.0  # the backend's own queue, where it publishes one
    reported_running: float = 0.0  # the requests it runs, where it publishes them
    reported_own: int = 0  # our `in_flight` when it last published running or waiting
    reported_ttft: float | None = None  # its predicted time to first token, where it publishes one
    reported_at: float = -math.inf  # when `reported_ttft` was last published
    reported_rate: float | None = None  # prompt tokens it prefills per second, where it publishes it
    cooling_until: float = 0.0  # Retry-After: no traffic before this time

    @classmethod
    def make(
        cls,
        name: str,
        weight: float = 1.0,
        max_concurrency: int | None = None,
        breaker: BreakerConfig | None = None,
    ) -> Backend:
        if weight <= 0:
            raise ValueError(f"backend {name}: weight must be > 0, got {weight}")
        return cls(name, weight, max_concurrency, Breaker(breaker or BreakerConfig()))

    @property
    def load(self) -> float:
        """Requests in flight from here, plus those the backend last reported holding (running and
        waiting) beyond the ones we had in flight then: other clients' requests.

        Not in-flight plus its queue: our requests are in its queue, so that counted them twice (with
        the gateway as a backend's only client, each of its queued requests was load 2 and pushed keys
        off their backend). Not max(in-flight, its count) either: its count is as old as its last
        answer, and requests that have ended since would keep weighing on it until the next one."""
        others = self.reported_running + self.reported_waiting - self.reported_own
        return self.in_flight + max(0.0, others)

    def available(self, now: float) -> bool:
        """Takes a request now: breaker lets it through, not cooling, under its cap."""
        if now < self.cooling_until:
            return False
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            return False
        return self.breaker.available(now)

    def wait_hint(self, now: float) -> float:
        """Seconds until it may take a request again, for a Retry-After (0: now, or when one finishes)."""
        return max(self.cooling_until - now, self.breaker.retry_after(now), 0.0)

    def acquire(self, now: float) -> Lease:
        self.in_flight += 1
        self.breaker.on_start(now)
        return Lease(self)

    def cool(self, now: float, seconds: float) -> None:
        """The backend said Retry-After: send it nothing for that long."""
        self.cooling_until = max(self.cooling_until, now + seconds)

    def report(
        self,
        waiting: float | None = None,
        ttft: float | None = None,
        now: float = 0.0,
        running: float | None = None,
        rate: float | None = None,
    ) -> None:
        """Load the backend published at `now` (its /load or /metrics, or an answer's header)."""
        if waiting is not None:
            self.reported_waiting = max(0.0, waiting)
        if running is not None:
            self.reported_running = max(0.0, running)
        if waiting is not None or running is not None:
            self.reported_own = self.in_flight
        if ttft is not None:
            self.reported_ttft = max(0.0, ttft)
            self.reported_at = now
        if rate is not None and rate > 0:
            self.reported_rate = rate

    def predicted_ttft(self, now: float, max_age: float) -> float | None:
        """The TTFT it last predicted, if published within `max_age` seconds; else None (unknown: judged
        by counts alone). A stale prediction is dropped, not trusted: the queue it saw has moved."""
        if self.reported_ttft is None or now - self.reported_at > max_age:
            return None
        return self.reported_ttft


@dataclass
class Lease:
    """One in-flight request on a backend; `release` records its outcome exactly once."""

    backend: Backend
    released: bool = False

    def release(self, now: float, outcome: str) -> None:
        """`outcome`: "success", "failure" (counts toward the breaker), or "neutral" (client gone,
        hedge loser)."""
        if self.released:
            return
        self.released = True
        b = self.backend
        b.in_flight -= 1
        if outcome == "success":
            b.breaker.on_success(now)
        elif outcome == "failure":
            b.breaker.on_failure(now)
        else:
            b.breaker.on_neutral(now)
