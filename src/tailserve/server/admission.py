"""Admission control: decide in microseconds, before any expensive work, whether a request may queue.

Every check reads counters, never the request's tokens: the server keeps its own count of admitted
engine requests and of prompt tokens not yet prefilled (the engine's stats snapshot lags by a step,
and would let a burst through). The queue-wait prediction divides the prompt tokens ahead of a
request by the engine's measured prefill rate; a request that would wait past `--max-queue-wait`,
or reach its first token only after its deadline, is shed now with a 429 and a `Retry-After`
rather than left to time out after holding a queue slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from tailserve.api.http import authorized


class LoadView(Protocol):
    """What admission reads from the engine's stats snapshot (`EngineStats`)."""

    num_running: int
    num_waiting: int
    prefill_tokens_per_s: float


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int  # the engine's running slots; requests beyond them queue
    max_num_batched_tokens: int  # the engine's per-step token budget, shared by decodes and prefill
    max_queue: int  # queued requests (beyond the running slots)
    max_queue_tokens: int  # prompt tokens admitted but not yet prefilled
    max_queue_wait: float | None = None  # seconds of predicted queue wait
    request_timeout: float | None = None  # seconds; the default per-request deadline


class Rejected(Exception):
    """Shed at admission: `status` 429 (load; retry after `retry_after` s) or 503 (draining)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def estimate_tokens(num_chars: int) -> int:
    """Prompt tokens guessed from text length (about 4 characters a token for English BPE vocabularies)."""
    return max(1, math.ceil(num_chars / 4))


class Admission:
    def __init__(self, limits: Limits, api_key: str | None = None) -> None:
        self.limits = limits
        self.api_key = api_key
        self.draining = False
        self.in_flight = 0  # engine requests admitted and not finished
        self.queued_tokens = 0  # prompt tokens of admitted engine requests with no output yet

    def authorized(self, authorization: str | None) -> bool:
        return authorized(authorization, self.api_key)

    def timeout(self, requested: float | None) -> float | None:
        """The request's own timeout, capped by the server's `--request-timeout`."""
        given = [t for t in (requested, self.limits.request_timeout) if t is not None]
        return min(given) if given else None

    def queued_requests(self, load: LoadView, extra: int = 0) -> int:
        """Requests that would be waiting with `extra` more: beyond the running slots, or behind ones the
        engine could not start (KV pool full). The engine's count is capped by ours, so a stale
        snapshot from before the last abort can never block an idle server."""
        engine_waiting = min(load.num_waiting, self.in_flight)
        beyond_slots = self.in_flight + extra - self.limits.max_num_seqs
        return max(0, beyond_slots, engine_waiting + extra if engine_waiting else 0)

    def prefill_rate(self, load: LoadView) -> float:
        """Prompt tokens per second, less the share of each step's token budget that decodes take."""
        budget = self.limits.max_num_batched_tokens
        share = max(budget - load.num_running, 1) / budget
        return load.prefill_tokens_per_s * share

    def predict(self, load: LoadView, tokens: int) -> tuple[float, float] | None:
        """(seconds until prefill of the new prompts starts, seconds until it ends), or None before the
        engine has measured a prefill rate. Optimistic: it ignores waits for a running slot to free."""
        rate = self.prefill_rate(load)
        if rate <= 0:
            return None
        return self.queued_tokens / rate, (self.queued_tokens + tokens) / rate

    def admit(self, load: LoadView, count: int, tokens_each: int, timeout: float | None) -> Ticket:
        """Reserve `count` engine requests of `tokens_each` prompt tokens, or raise Rejected."""
        if self.draining:
            raise Rejected(503, "draining", "the server is shutting down and admits no new requests", 5)
        ticket = Ticket(self, count, 0)
        self._check_count(load, count)
        self._check_tokens(load, count * tokens_each, timeout)
        self.in_flight += count
        ticket.resize(load, tokens_each, timeout, check=False)
        return ticket

    def _check_count(self, load: LoadView, count: int) -> None:
        if self.queued_requests(load, count) > self.limits.max_queue:
            raise Rejected(
                429,
                "queue_full",
                f"the queue is full ({self.limits.max_queue} waiting requests); retry later",
                self._retry_after(load),
            )

    def _check_tokens(self, load: LoadView, tokens: int, timeout: float | None) -> None:
        lim = self.limits
        if self.queued_tokens and self.queued_tokens + tokens > lim.max_queue_tokens:
            raise Rejected(
                429,
                "queue_full",
                f"the queue holds {self.queued_tokens} prompt tokens, and this "
                f"request's {tokens} would pass the cap of {lim.max_queue_tokens}; retry later",
                self._retry_after(load),
            )
        pred = self.predict(load, tokens)
        if pred is None:
            return
        start, end = pred
        if lim.max_queue_wait is not None and start > lim.max_queue_wait:
            raise Rejected(
                429,
                "queue_wait_exceeded",
                f"the predicted queue wait of {start:.2f} s exceeds "
                f"the server's limit of {lim.max_queue_wait:g} s; retry later",
                self._retry_after(load),
            )
        if timeout is not None and end > timeout:
            raise Rejected(
                429,
                "deadline_unmeetable",
                f"the predicted time to the first token, {end:.2f} s, "
                f"exceeds the request's timeout of {timeout:g} s; retry later",
                self._retry_after(load),
            )

    def _retry_after(self, load: LoadView) -> int:
        """Whole seconds until the prompt tokens queued now are predicted to be prefilled (at least 1)."""
        pred = self.predict(load, 0)
        return max(1, math.ceil(pred[0])) if pred else 1


class Ticket:
    """One HTTP request's reservation: `count` engine requests, each `tokens` prompt tokens.

    Each engine request leaves the token queue at its first output (`started`) and the in-flight count
    when it ends (`finished`); `release` ends whatever is left, exactly once, on every exit path.
    """

    def __init__(self, admission: Admission, count: int, tokens: int) -> None:
        self._adm = admission
        self.count = count
        self.tokens = tokens
        self._started: set[int] = set()
        self._finished: set[int] = set()

    def resize(self, load: LoadView, tokens: int, timeout: float | None, check: bool = True) -> None:
        """Swap the estimated prompt size for the exact one after tokenizing, re-checking the token caps."""
        adm = self._adm
        waiting = self.count - len(self._started)
        adm.queued_tokens -= waiting * self.tokens
        self.tokens = tokens
        if check:
            try:
                adm._check_tokens(load, waiting * tokens, timeout)
            except Rejected:
                self.tokens = 0
                raise
        adm.queued_tokens += waiting * tokens

    def started(self, i: int) -> None:
        if i not in self._started and i not in self._finished:
            self._started.add(i)
            self._adm.queued_tokens -= self.tokens

    def finished(self, i: int) -> None:
        if i in self._finished:
            return
        self.started(i)
        self._finished.add(i)
        self._adm.in_flight -= 1

    def release(self) -> None:
        for i in range(self.count):
            self.finished(i)

    @property
    def done(self) -> bool:
        return len(self._finished) == self.count
