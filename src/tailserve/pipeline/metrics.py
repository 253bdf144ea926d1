"""Prometheus metrics of a pipeline app, named like the server's (`tailserve:pipeline_*`): per-stage
latency histograms (p50/p95/p99 by `histogram_quantile`) and overrun counters, observed from the
request's record after it ends; cache, compression, tool and prefix-check counters read from their
owners at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from tailserve.obs.metrics import LATENCY_BUCKETS, PREFIX
from tailserve.pipeline.cache import TTLCache
from tailserve.pipeline.compressor import CompressionStats
from tailserve.pipeline.layout import StableCheck
from tailserve.pipeline.record import RequestRecord
from tailserve.pipeline.tools import ToolOutcome

P = PREFIX + "pipeline_"


class _Owned(Collector):
    """Counters kept by their owners (caches, the compressor, the layout check), read when scraped."""

    def __init__(
        self, caches: Sequence[TTLCache], compression: CompressionStats | None, stable: StableCheck | None
    ) -> None:
        self.caches, self.compression, self.stable = caches, compression, stable

    def collect(self) -> Iterator[Metric]:
        for field, doc in (
            ("hits", "Cache lookups that found a fresh entry."),
            ("misses", "Cache lookups that found none (or an expired one)."),
            ("expired", "Misses where the entry had outlived its TTL."),
            ("evicted", "Entries pushed out by the size bound."),
        ):
            c = CounterMetricFamily(P + f"cache_{field}", doc, labels=["cache"])
            for cache in self.caches:
                c.add_metric([cache.name], getattr(cache.stats, field))
            yield c
        if self.compression is not None:
            for name, counts, label, doc in (
                ("compression_decisions", self.compression.decisions, "reason", "Compression decisions."),
                ("compression_results", self.compression.results, "used", "Compressions done, by result."),
                (
                    "compression_validation_failures",
                    self.compression.validation_failures,
                    "reason",
                    "Summaries rejected by validation (the fallback was used).",
                ),
            ):
                c = CounterMetricFamily(P + name, doc, labels=[label])
                for key, n in sorted(counts.items()):
                    c.add_metric([key], n)
                yield c
        if self.stable is not None:
            c = CounterMetricFamily(
                P + "stable_prefix_changes",
                "Requests whose stable prompt part changed in their conversation.",
            )
            c.add_metric([], self.stable.changed)
            yield c


class PipelineMetrics:
    def __init__(
        self,
        caches: Sequence[TTLCache] = (),
        compression: CompressionStats | None = None,
        stable: StableCheck | None = None,
    ) -> None:
        reg = self.registry = CollectorRegistry()
        self.stage = Histogram(
            P + "stage_seconds", "Time each stage used, by outcome.", ["stage", "outcome"],
            registry=reg, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.overruns = Counter(
            P + "stage_overruns", "Stages that ran out of their allowance, by the policy's outcome.",
            ["stage", "outcome"], registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            P + "request_seconds",
            "Whole pipeline requests.",
            ["degraded"],
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.tool = Histogram(
            P + "tool_seconds", "Tool calls, by tool and status.", ["tool", "status"],
            registry=reg, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        reg.register(_Owned(caches, compression, stable))

    def observe(self, rec: RequestRecord, tools: Sequence[ToolOutcome] = ()) -> None:
        for s in rec.stages:
            self.stage.labels(s.name, s.outcome).observe(s.elapsed_s)
            if s.overrun:
                self.overruns.labels(s.name, s.outcome).inc()
        self.e2e.labels(str(rec.degraded).lower()).observe(rec.e2e_s)
        for t in tools:
            self.tool.labels(t.name, t.status).observe(t.elapsed_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
