"""A span per request (child of the caller's), a child per attempt, and the attempt's context upstream."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.gateway.conftest import Fake, chat, fakes, gateway

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def test_request_span_with_a_child_per_attempt_forwarded_upstream() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        fakes(Fake(script=["503"])) as (f,),
        gateway({"models": {"m": {"backends": [{"url": f.url}]}}}, provider) as gw,
    ):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=chat(),
            headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.kind == SpanKind.SERVER)
    attempts = sorted((s for s in spans if s.name == "attempt"), key=lambda s: s.start_time)
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == CALLER_SPAN  # type: ignore[union-attr]
    assert len(attempts) == 2
    assert all(a.parent.span_id == root.context.span_id for a in attempts)  # type: ignore[union-attr]
    assert [a.attributes["tailserve.attempt"] for a in attempts] == [1, 2]
    assert attempts[0].attributes["error.type"] == "retryable"
    sent = [h["traceparent"] for _, h in f.requests]
    assert sent == [f"00-{TRACE_ID}-{a.context.span_id:016x}-01" for a in attempts]
