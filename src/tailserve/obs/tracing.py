"""OpenTelemetry traces: a server span per HTTP request, with a child span per stage of each choice.

Spans are built after the request ends, from its time stamps, on the observer's thread: while a request
runs, tracing costs the hot path only the parsing of its `traceparent` header. This module is imported
only when tracing is on, so with tracing off OpenTelemetry is never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, format_trace_id

from tailserve.obs.observer import RequestRecord, phases

EXPORTERS = ("console", "otlp")


def make_tracer_provider(exporter: str) -> TracerProvider:
    """A provider exporting in batches on its own thread. `otlp` follows the OTEL_EXPORTER_OTLP_*
    environment variables (endpoint, headers) and needs `opentelemetry-exporter-otlp-proto-http`."""
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError(
                "--otel-exporter otlp needs the OTLP exporter: "
                "pip install opentelemetry-exporter-otlp-proto-http"
            ) from None
        span_exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"unknown --otel-exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "tailserve")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


class Tracing:
    def __init__(self, provider: TracerProvider, model: str) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("tailserve")
        self.model = model

    @staticmethod
    def parent(headers: Mapping[str, str]) -> Context:
        """The caller's context from `traceparent`/`tracestate` (the configured propagators), so its trace
        continues through us; an empty context (a new trace) when there is none."""
        return propagate.extract(headers)

    def emit(self, rec: RequestRecord, ns: Callable[[float], int]) -> str | None:
        """Export the request's spans; `ns` turns perf_counter stamps into epoch nanoseconds.
        Returns the trace id (hex) when the span was sampled."""
        end = rec.responded if rec.responded is not None else rec.arrival
        root = self.tracer.start_span(
            f"POST {rec.route}", context=rec.parent, kind=SpanKind.SERVER, start_time=ns(rec.arrival)
        )
        if not root.is_recording():  # not sampled (e.g. the caller's traceparent says so)
            root.end(ns(end))
            return None
        outs = [(i, o) for i, o in enumerate(rec.outputs) if o is not None]
        many = len(rec.outputs) > 1
        ctx = trace.set_span_in_context(root)
        for i, out in outs:
            if out.times is None:
                continue
            for name, start, stop in phases(out.times, out.finish_reason, rec.responded):
                if start is None or stop is None:
                    continue
                span = self.tracer.start_span(name, context=ctx, start_time=ns(start))
                if many:
                    span.set_attribute("tailserve.choice", i)
                span.end(ns(stop))
        root.set_attributes(
            {
                "tailserve.request_id": rec.request_id,
                "http.request.method": "POST",
                "http.route": rec.route,
                "http.response.status_code": rec.status,
                "gen_ai.request.model": self.model,
                "gen_ai.usage.input_tokens": sum(o.num_prompt_tokens for _, o in outs),
                "gen_ai.usage.output_tokens": sum(o.num_output_tokens for _, o in outs),
                "tailserve.cached_tokens": sum(o.num_cached_tokens for _, o in outs),
                "gen_ai.response.finish_reasons": [o.finish_reason or "" for _, o in outs],
            }
        )
        failed = [o.finish_reason for _, o in outs if o.finish_reason in ("abort", "error")]
        if rec.error is not None or failed:
            root.set_attribute("error.type", rec.error or str(failed[0]))
            root.set_status(Status(StatusCode.ERROR))
        root.end(ns(end))
        return format_trace_id(root.get_span_context().trace_id)
