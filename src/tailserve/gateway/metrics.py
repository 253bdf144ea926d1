"""The gateway's Prometheus metrics, in the project's naming (prefix `tailserve:gateway_`).

Counters and the TTFT histogram are observed as requests go; breaker state and in-flight are read
from the routing state at scrape time, so they can never disagree with what the chooser sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tailserve.obs.metrics import LATENCY_BUCKETS, PREFIX
from tailserve.routing.breaker import STATE_VALUE

G = PREFIX + "gateway_"
NO_BACKEND = "none"  # the backend label of answers no backend gave (404, degraded 503, deadline)


class _StateCollector(Collector):
    def __init__(
        self,
        backends: Callable[[], Iterable[tuple[str, str, object]]],
        decisions: Callable[[], Iterable[tuple[str, Mapping[str, int]]]],
    ) -> None:
        self.backends = backends  # (model, backend name, routing.Backend)
        self.decisions = decisions  # (model, its Chooser's choices by reason)

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        state = GaugeMetricFamily(
            G + "breaker_state",
            "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            labels=["model", "backend"],
        )
        in_flight = GaugeMetricFamily(
            G + "in_flight", "Requests in flight per backend.", labels=["model", "backend"]
        )
        waiting = GaugeMetricFamily(
            G + "backend_reported_waiting", "The queue a backend last reported.", labels=["model", "backend"]
        )
        for model, name, b in self.backends():
            state.add_metric([model, name], STATE_VALUE[b.breaker.current(now)])  # type: ignore[attr-defined]
            in_flight.add_metric([model, name], b.in_flight)  # type: ignore[attr-defined]
            waiting.add_metric([model, name], b.reported_waiting)  # type: ignore[attr-defined]
        choices = CounterMetricFamily(
            G + "route_decisions",
            "Backend choices, by why the backend was chosen (routing/chooser.py REASONS).",
            labels=["model", "reason"],
        )
        for model, counts in self.decisions():
            for reason, n in counts.items():
                choices.add_metric([model, reason], n)
        yield state
        yield in_flight
        yield waiting
        yield choices


class GatewayMetrics:
    def __init__(
        self,
        backends: Callable[[], Iterable[tuple[str, str, object]]],
        decisions: Callable[[], Iterable[tuple[str, Mapping[str, int]]]] = list,
    ) -> None:
        reg = self.registry = CollectorRegistry()
        self.requests = Counter(
            G + "requests",
            "Requests answered, by public model, the backend that answered, and status.",
            ["model", "backend", "status"],
            registry=reg,
        )
        self.attempts = Counter(
            G + "attempts",
            "Upstream attempts, by outcome (ok, http_error, retryable, connect_error, timeout, cancelled).",
            ["model", "backend", "outcome"],
            registry=reg,
        )
        self.retries = Counter(G + "retries", "Attempts after a request's first.", ["model"], registry=reg)
        self.fallbacks = Counter(
            G + "fallbacks", "Moves to the next model of a fallback chain.", ["model", "to"], registry=reg
        )
        self.budget_exhausted = Counter(
            G + "retry_budget_exhausted", "Retries refused by the retry budget.", ["model"], registry=reg
        )
        self.ttft = Histogram(
            G + "upstream_ttft_seconds",
            "Attempt start to the first byte of the backend's answer body.",
            ["model", "backend"],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        reg.register(_StateCollector(backends, decisions))

    def render(self) -> bytes:
        return generate_latest(self.registry)
