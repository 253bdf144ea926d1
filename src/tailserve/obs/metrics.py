"""Prometheus metrics (`GET /metrics`), named as the field names them (prefix `tailserve:`).

The engine thread does almost nothing for them: its step hook appends finished outputs and the stats
snapshot to deques, and they are observed on the observer's thread, or at scrape time (`render` flushes
first, so a scrape taken after a response arrived always includes that request). Gauges and the cache
counters are read from the engine's stats snapshot while scraping. Every latency figure comes from the
`RequestTimes` properties; nothing here recomputes one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tailserve.engine.engine import EngineStats, LLMEngine
    from tailserve.engine.outputs import RequestOutput

PREFIX = "tailserve:"

# 1 ms to 60 s, about 1.5x apart: fine enough that a histogram's p50 lands within a few percent.
LATENCY_BUCKETS = (
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0,
)  # fmt: skip
STEP_TIME_BUCKETS = (0.00025, 0.0005, *LATENCY_BUCKETS[: LATENCY_BUCKETS.index(10.0) + 1])
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# Prompt-length buckets (tokens): each label covers [previous edge, edge).
PROMPT_LEN_EDGES = ((128, "<128"), (512, "128-512"), (2048, "512-2k"), (8192, "2k-8k"))
PROMPT_LEN_LAST = ">=8k"
PROMPT_LEN_BUCKETS = (*(label for _, label in PROMPT_LEN_EDGES), PROMPT_LEN_LAST)

FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = (
    "queue_full", "overloaded", "deadline", "invalid", "unauthorized", "draining", "not_ready", "error",
)  # fmt: skip
# Admission and server error codes → the reason label; other 4xx are "invalid", other 5xx "error".
_REJECT_BY_CODE = {
    "queue_full": "queue_full",
    "queue_wait_exceeded": "overloaded",
    "deadline_unmeetable": "deadline",
    "deadline_exceeded": "deadline",
    "invalid_api_key": "unauthorized",
    "draining": "draining",
    "not_ready": "not_ready",
}


def prompt_len_bucket(num_tokens: int) -> str:
    for edge, label in PROMPT_LEN_EDGES:
        if num_tokens < edge:
            return label
    return PROMPT_LEN_LAST


def reject_reason(status: int, code: str | None) -> str:
    """The `reason` label of a request answered with an error status."""
    if code in _REJECT_BY_CODE:
        return _REJECT_BY_CODE[code]
    return "invalid" if 400 <= status < 500 else "error"


class StatsSource(Protocol):
    """What the scrape-time collector reads: the engine's latest stats snapshot (`AsyncEngine.stats`)."""

    @property
    def stats(self) -> EngineStats: ...


class _EngineCollector(Collector):
    """Gauges and cumulative counters taken from the stats snapshot at scrape time: no engine work."""

    def __init__(self, engine: StatsSource, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        gauges = (
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting in the engine's queue.", s.num_waiting),
            ("kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).", s.kv_cache_usage),
        )
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Requests preempted (to be recomputed).", s.num_preemptions),
            ("prefix_cache_evictions", "Cached KV blocks evicted to make room.", s.prefix_cache_evictions),
        )
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model"])
            g.add_metric([self.model], value)
            yield g
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model"])
            c.add_metric([self.model], value)
            yield c
        tier = GaugeMetricFamily(
            PREFIX + "cpu_tier_info",
            "1, labelled with the CPU tier the fused step's kernels run at (none: the PyTorch path).",
            labels=["model", "tier"],
        )
        tier.add_metric([self.model, s.cpu_tier], 1)
        yield tier
        yield from self._speculation(s)

    def _speculation(self, s: EngineStats) -> Iterator[Metric]:
        """Speculative decoding, labelled by proposer (off: all zero)."""
        labels = [self.model, s.spec_proposer]
        drafts, accepted, steps = (
            s.spec_decode_num_draft_tokens,
            s.spec_decode_num_accepted_tokens,
            s.spec_decode_num_verify_steps,
        )
        for name, doc, value in (
            ("spec_decode_num_draft_tokens", "Tokens guessed by the proposer.", drafts),
            ("spec_decode_num_accepted_tokens", "Guessed tokens the target confirmed.", accepted),
            ("spec_decode_num_verify_steps", "Request-steps that verified guesses.", steps),
        ):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model", "proposer"])
            c.add_metric(labels, value)
            yield c
        for name, doc, value in (
            (
                "spec_decode_acceptance_rate",
                "Share of guessed tokens accepted, so far.",
                accepted / drafts if drafts else 0.0,
            ),
            (
                "spec_decode_mean_accepted_length",
                "Tokens emitted per request-step that verified guesses (accepted + the target's own).",
                1 + accepted / steps if steps else 0.0,
            ),
        ):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model", "proposer"])
            g.add_metric(labels, value)
            yield g


class Metrics:
    """One server's metrics, in a registry of its own (two apps in one process never collide)."""

    def __init__(self, model: str, engine: StatsSource) -> None:
        self.model = model
        reg = self.registry = CollectorRegistry()
        by_len = ("model", "prompt_len_bucket")

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, by_len, registry=reg, buckets=LATENCY_BUCKETS)

        self.ttft = latency("time_to_first_token_seconds", "Arrival to first token, per request.")
        self.itl = latency(
            "inter_token_latency_seconds", "Every gap between consecutive output tokens (token-weighted)."
        )
        self.tpot = latency(
            "request_time_per_output_token_seconds",
            "Decode time over output tokens after the first, one value per request (request-weighted).",
        )
        self.e2e = latency("e2e_request_latency_seconds", "Arrival to finish, per request.")
        self.queue = latency("request_queue_time_seconds", "Admitted to first scheduled, per request.")
        self.prefill = latency("request_prefill_time_seconds", "First scheduled to first token, per request.")
        self.decode = latency("request_decode_time_seconds", "First token to last token, per request.")
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of prefilled requests.", ["model"], registry=reg
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Output tokens generated.", ["model"], registry=reg
        )
        self.finished = Counter(
            PREFIX + "request_success",
            "Engine requests finished, by reason (stop, length, abort, error).",
            ["model", "finished_reason"],
            registry=reg,
        )
        self.rejected = Counter(
            PREFIX + "requests_rejected",
            "HTTP requests answered with an error status, by reason.",
            ["model", "reason"],
            registry=reg,
        )
        self.slow_reader_aborts = Counter(
            PREFIX + "slow_reader_aborts",
            "Streams aborted because their client read too slowly (--stream-buffer deltas behind).",
            ["model"],
            registry=reg,
        )
        self.slow_reader_aborts.labels(model)
        self.batch_size = Histogram(
            PREFIX + "step_batch_size",
            "Sequences in each engine step.",
            ["model"],
            registry=reg,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.batch_tokens = Histogram(
            PREFIX + "step_batch_tokens",
            "Tokens (decodes plus prefill chunks) in each engine step.",
            ["model"],
            registry=reg,
            buckets=BATCH_TOKEN_BUCKETS,
        )
        self.step_time = Histogram(
            PREFIX + "step_time_seconds",
            "Wall time of each engine step (schedule, model, sample, update).",
            ["model"],
            registry=reg,
            buckets=STEP_TIME_BUCKETS,
        )
        reg.register(_EngineCollector(engine, model))
        for reason in FINISH_REASONS:  # series exist from the start, so rate() sees the first increase
            self.finished.labels(model, reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        self._outputs: deque[RequestOutput] = deque()
        self._stats: deque[EngineStats] = deque()
        self._pushed: EngineStats | None = None
        self._last_step = 0
        self._lock = threading.Lock()

    def on_step(self, engine: LLMEngine, outs: list[RequestOutput]) -> None:
        """The engine-thread hook: queue finished outputs and a new stats snapshot; observe nothing here."""
        for out in outs:
            if out.finished:
                self._outputs.append(out)
        stats = engine.stats
        if stats is not self._pushed:
            self._pushed = stats
            self._stats.append(stats)

    def reject(self, status: int, code: str | None) -> None:
        self.rejected.labels(self.model, reject_reason(status, code)).inc()

    def flush(self) -> None:
        """Observe everything queued so far (observer thread, and each scrape)."""
        with self._lock:
            while self._stats:
                self._observe_step(self._stats.popleft())
            while self._outputs:
                self._observe(self._outputs.popleft())

    def render(self) -> bytes:
        """The exposition text of a scrape."""
        self.flush()
        return generate_latest(self.registry)

    def _observe_step(self, s: EngineStats) -> None:
        # A snapshot taken after an abort copies the last step's figures: a new step time marks a new step.
        if s.num_steps != self._last_step and s.last_batch_size:
            self.batch_size.labels(self.model).observe(s.last_batch_size)
            self.batch_tokens.labels(self.model).observe(s.last_batch_tokens)
            self.step_time.labels(self.model).observe(s.last_step_time)
        self._last_step = s.num_steps

    def _observe(self, out: RequestOutput) -> None:
        m = self.model
        self.finished.labels(m, out.finish_reason or "error").inc()
        self.generation_tokens.labels(m).inc(out.num_output_tokens)
        t = out.times
        if t is None:
            return
        if t.first_token is not None:
            self.prompt_tokens.labels(m).inc(out.num_prompt_tokens)
        b = prompt_len_bucket(out.num_prompt_tokens)
        for hist, value in (
            (self.ttft, t.ttft),
            (self.tpot, t.time_per_output_token),
            (self.e2e, t.e2e),
            (self.queue, t.queue_time),
            (self.prefill, t.prefill_time),
            (self.decode, t.decode_time),
        ):
            if value is not None:
                hist.labels(m, b).observe(value)
        itl = self.itl.labels(m, b)
        for gap in t.inter_token_latencies:
            itl.observe(gap)
