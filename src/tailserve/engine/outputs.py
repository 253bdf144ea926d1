"""What the engine hands back: per-step deltas of one request, and the request's time stamps.

Every latency figure derives from `RequestTimes`, in one place (`RequestTimes` properties), so the
server, the metrics and the logs never recompute them differently.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob)


@dataclass
class RequestTimes:
    """Monotonic time stamps (time.perf_counter) of one request's life."""

    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # accepted into the engine's waiting queue
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled is None:
            return None
        return self.first_scheduled - (self.admitted or self.arrival)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def prefill_time(self) -> float | None:
        if self.first_token is None or self.first_scheduled is None:
            return None
        return self.first_token - self.first_scheduled

    @property
    def decode_time(self) -> float | None:
        if self.first_token is None or self.last_token is None:
            return None
        return self.last_token - self.first_token

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def time_per_output_token(self) -> float | None:
        n = len(self.token_times)
        if n < 2 or self.decode_time is None:
            return None
        return self.decode_time / (n - 1)


@dataclass
class RequestOutput:
    """The delta of one request after one engine step (or its final state when `finished`)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    times: RequestTimes | None = None
