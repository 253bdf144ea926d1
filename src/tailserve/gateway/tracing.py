"""The gateway's spans: one per request (a child of the caller's `traceparent`), one child per attempt,
and that attempt's context sent upstream as `traceparent`, so a backend's span is a child of the
attempt that called it. With tracing off the caller's trace headers are forwarded unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACE_HEADERS = ("traceparent", "tracestate")


class GatewayTracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("tailserve.gateway")

    def request_span(self, route: str, headers: Mapping[str, str], request_id: str) -> Span:
        span = self.tracer.start_span(
            f"POST {route}", context=propagate.extract(headers), kind=SpanKind.SERVER
        )
        span.set_attribute("tailserve.request_id", request_id)
        return span

    def attempt_span(self, parent: Span, model: str, backend: str, number: int, hedge: bool = False) -> Span:
        span = self.tracer.start_span(
            "attempt",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.request.model": model,
                "tailserve.backend": backend,
                "tailserve.attempt": number,
            },
        )
        if hedge:  # the second of a hedged pair; its twin has the same number
            span.set_attribute("tailserve.hedge", True)
        return span

    @staticmethod
    def inject(span: Span, headers: dict[str, str]) -> None:
        propagate.inject(headers, context=trace.set_span_in_context(span))


def end_span(span: Span | None, status: int | None, error: str | None = None) -> None:
    if span is None:
        return
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def passthrough(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's trace headers, to forward when the gateway makes no spans of its own."""
    return {h: headers[h] for h in TRACE_HEADERS if h in headers}
