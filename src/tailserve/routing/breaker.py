"""A circuit breaker per backend: closed → open after `failures` failures within `window` seconds;
open → half-open after `open_for` seconds; half-open lets `probes` requests through at a time and
closes after `successes` of them succeed, or opens again on the first failure.

An open breaker takes a dead backend out of the choice at once, instead of every request paying a
connect timeout to find out; the probes bring it back without a thundering herd.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The gauge's values for the breaker state (Prometheus has no enum type).
STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


@dataclass
class BreakerConfig:
    failures: int = 5  # failures within the window that open the breaker
    window: float = 10.0  # seconds
    open_for: float = 5.0  # seconds before the first probe
    probes: int = 1  # requests let through at a time while half-open
    successes: int = 2  # probe successes that close it


@dataclass
class Breaker:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: State = State.CLOSED
    opened_at: float = 0.0
    _failures: deque[float] = field(default_factory=deque)
    _probing: int = 0
    _probe_successes: int = 0
    transitions: int = 0  # every change of state, for tests and metrics

    def _set(self, state: State, now: float) -> None:
        if state is not self.state:
            self.transitions += 1
        self.state = state
        if state is State.OPEN:
            self.opened_at = now
        self._probing = self._probe_successes = 0
        self._failures.clear()

    def current(self, now: float) -> State:
        """The state at `now` (open turns half-open once its time is up)."""
        if self.state is State.OPEN and now - self.opened_at >= self.config.open_for:
            self._set(State.HALF_OPEN, now)
        return self.state

    def available(self, now: float) -> bool:
        """Whether a request may be sent now (without taking a probe slot)."""
        state = self.current(now)
        return state is State.CLOSED or (state is State.HALF_OPEN and self._probing < self.config.probes)

    def on_start(self, now: float) -> None:
        """A request was sent: while half-open it holds a probe slot until its outcome is recorded."""
        if self.current(now) is State.HALF_OPEN:
            self._probing += 1

    def on_success(self, now: float) -> None:
        state = self.current(now)
        if state is State.HALF_OPEN:
            self._probing = max(0, self._probing - 1)
            self._probe_successes += 1
            if self._probe_successes >= self.config.successes:
                self._set(State.CLOSED, now)

    def on_failure(self, now: float) -> None:
        state = self.current(now)
        if state is State.HALF_OPEN:
            self._set(State.OPEN, now)
        elif state is State.CLOSED:
            self._failures.append(now)
            while self._failures and now - self._failures[0] > self.config.window:
                self._failures.popleft()
            if len(self._failures) >= self.config.failures:
                self._set(State.OPEN, now)

    def on_neutral(self, now: float) -> None:
        """A request ended saying nothing of the backend's health (the client left): frees its probe slot."""
        if self.current(now) is State.HALF_OPEN:
            self._probing = max(0, self._probing - 1)

    def retry_after(self, now: float) -> float:
        """Seconds until this breaker lets a request through again (0 if it does now)."""
        if self.available(now):
            return 0.0
        if self.state is State.OPEN:
            return max(0.0, self.opened_at + self.config.open_for - now)
        return self.config.open_for  # half-open, probes all taken: about one probe's time
