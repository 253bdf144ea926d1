"""OpenTelemetry spans for a pipeline request: one span for the request, one child per stage with its
budget, time used and outcome. Built after the request from its record's time stamps, as the server's
spans are (obs/tracing.py), so tracing costs the request path nothing; the provider comes from
`obs.tracing.make_tracer_provider`. The request span's context can be sent to the LLM server as
`traceparent` (`headers`), making the server's span a child of the pipeline's."""

from __future__ import annotations

import time

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from tailserve.pipeline.record import RequestRecord


class PipelineTracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("tailserve.pipeline")
        # perf_counter → epoch ns, fixed once (spans are placed by the budget clock's stamps)
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def ns(self, t: float) -> int:
        return self._offset_ns + int(t * 1e9)

    def start(self, name: str) -> Span:
        """The request's span, opened on arrival so calls made under it can carry its context."""
        return self.tracer.start_span(name, kind=SpanKind.SERVER)

    @staticmethod
    def headers(span: Span) -> dict[str, str]:
        out: dict[str, str] = {}
        propagate.inject(out, context=trace.set_span_in_context(span))
        return out

    def finish(self, span: Span, rec: RequestRecord) -> None:
        """A child span per stage, then the request span's own attributes; ends it."""
        ctx = trace.set_span_in_context(span)
        for s in rec.stages:
            child = self.tracer.start_span(f"stage {s.name}", context=ctx, start_time=self.ns(s.start))
            child.set_attributes(
                {
                    "tailserve.stage": s.name,
                    "tailserve.stage.budget_s": s.allowance_s,
                    "tailserve.stage.used_s": s.elapsed_s,
                    "tailserve.stage.outcome": s.outcome,
                    "tailserve.stage.overrun": s.overrun,
                }
            )
            if s.error is not None:
                child.set_attribute("error.type", s.error)
                child.set_status(Status(StatusCode.ERROR))
            child.end(self.ns(s.end))
        span.set_attributes(
            {
                "tailserve.budget_s": rec.budget_s,
                "tailserve.used_s": rec.e2e_s,
                "tailserve.degraded": rec.degraded,
            }
        )
        span.end(self.ns(rec.end))
