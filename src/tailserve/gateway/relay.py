"""A committed stream: the backend's bytes passed to the client as they arrive, no re-framing.

Once the first byte has gone to the client nothing can be retried; a failure after that ends the
stream with an OpenAI error event and `[DONE]`. Closing the relay (stream end, client gone, error)
closes the upstream connection, so a tailserve backend aborts the request and frees its blocks
within a step, and releases the backend's in-flight slot with the attempt's outcome.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from opentelemetry.trace import Span

from tailserve.api.errors import ApiError
from tailserve.api.sse import DONE, sse_error
from tailserve.gateway.h1client import Response
from tailserve.gateway.metrics import GatewayMetrics
from tailserve.gateway.tracing import end_span
from tailserve.gateway.upstream import Upstream
from tailserve.routing.backends import Lease


def _end_with(err: ApiError) -> bytes:
    # A blank line first ends any event the backend left half-written.
    return ("\n\n" + sse_error(err) + DONE).encode()


@dataclass
class Relay:
    model: str  # the public model served
    upstream: Upstream
    response: Response
    lease: Lease
    first: bytes
    chunks: AsyncIterator[bytes]
    deadline: float
    metrics: GatewayMetrics
    span: Span | None = None
    outcome: str = "neutral"  # until the stream ends: a client that leaves says nothing of the backend
    label: str = "cancelled"
    _closed: bool = field(default=False, init=False)

    async def body(self) -> AsyncIterator[bytes]:
        yield self.first
        try:
            async for chunk in self.chunks:
                yield chunk
                if time.monotonic() > self.deadline:
                    self.label = "deadline"
                    yield _end_with(
                        ApiError(504, "the request ran past its deadline", code="deadline_exceeded")
                    )
                    return
            self.outcome, self.label = "success", "ok"
        except httpx.TimeoutException:
            if time.monotonic() >= self.deadline:
                self.label = "deadline"
                err = ApiError(504, "the request ran past its deadline", code="deadline_exceeded")
            else:
                self.outcome, self.label = "failure", "timeout"
                err = ApiError(504, "the backend stopped sending", code="upstream_timeout")
            yield _end_with(err)
        except httpx.HTTPError as e:
            self.outcome, self.label = "failure", "upstream_error"
            yield _end_with(
                ApiError(502, f"the backend's stream broke: {type(e).__name__}", code="upstream_error")
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.response.aclose()
        finally:
            self.lease.release(time.monotonic(), self.outcome)
            self.metrics.attempts.labels(self.model, self.upstream.name, self.label).inc()
            end_span(self.span, 200, None if self.outcome != "failure" else self.label)
