"""The cluster's HTTP front: reads a request, keys it for affinity, hands it to a replica through Ray
Serve's handle and router, and relays the replica's answer byte for byte.

The OpenAI protocol itself (validation, admission, deadlines, SSE framing, errors) runs once, in each
replica's copy of the single server's app; what the ingress answers itself uses the same api/ layer:
the body-size limit (413), the cluster-level 429 when every replica is full and the ingress queue is
at its cap (Ray's `max_queued_requests`), and 503 when replicas keep dying under a request.

A replica that dies before its answer began (no byte sent to the client) costs the client nothing:
the request goes again, to another replica (Ray drops the dead one from the router at once). Once
bytes have gone out, a stream ends with an error event instead, as a stream that failed on one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tailserve.api.errors import ApiError, error_response
from tailserve.api.http import read_body
from tailserve.api.sse import DONE, SSEResponse, sse_error
from tailserve.cluster.asgi import Start, request_scope
from tailserve.cluster.config import REPLICA_DEPLOYMENT
from tailserve.cluster.metrics import IngressMetrics, merge
from tailserve.cluster.router import LIVE
from tailserve.config import ServerConfig
from tailserve.routing.affinity import affinity_key

log = logging.getLogger("tailserve.cluster")
ATTEMPTS = 3  # sends of one request before a 503: each failed one lost its replica
SCRAPE_TIMEOUT = 5.0  # seconds a replica gets to answer a metrics scrape
LOST = (RayActorError, ReplicaUnavailableError)  # the replica died or went away under the request


def request_key(method: str, body: bytes, session: str | None) -> str | None:
    """The affinity key of a POST body (None when it is not a JSON object: the replica answers 400)."""
    if method != "POST":
        return None
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return affinity_key(obj, session) if isinstance(obj, dict) else None


def cancel(gen: Any) -> None:
    """End a replica call (its replica sees its stream closed); a call that failed may raise again."""
    if gen is not None:
        with contextlib.suppress(Exception):
            gen.cancel()


class Ingress:
    """The ingress deployment's user class; Ray Serve serves `__serve_build_asgi_app__`'s app."""

    def __init__(self, replicas: Any, config: ServerConfig) -> None:
        self.config = config
        self.replicas = replicas
        self.streams = replicas.options(stream=True)
        ctx = serve.get_replica_context()
        self.deployment = (ctx.app_name, REPLICA_DEPLOYMENT)
        self.metrics = IngressMetrics()
        self.tracer = None
        if config.otel_exporter:
            from tailserve.obs.tracing import make_tracer_provider

            self.tracer = make_tracer_provider(config.otel_exporter).get_tracer("tailserve.cluster")

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [Route("/metrics", self.scrape, methods=["GET"])]
        if not self.config.metrics:
            routes = []
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        routes.append(Route("/{path:path}", self.forward, methods=methods))
        return Starlette(routes=routes)

    # --- forwarding --------------------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.config.max_body_bytes)
        except ApiError as e:
            return error_response(e)
        key = request_key(request.method, body, request.headers.get("x-session-id"))
        headers = list(request.scope["headers"])
        span = self._span(request)
        if span is not None:
            headers = self._inject(span, headers)
        scope = request_scope(request.scope, headers)
        try:
            return await self._send(scope, body, key)
        finally:
            if span is not None:
                span.end()

    async def _send(self, scope: dict[str, Any], body: bytes, key: str | None) -> Response:
        for attempt in range(ATTEMPTS):
            gen = None
            try:
                gen = self.streams.forward.remote(scope, body, key=key)
                start = await gen.__anext__()
            except BackPressureError as e:  # nothing was sent (and cancelling would raise it again)
                self.metrics.rejected.labels("cluster_full").inc()
                retry = str(max(1, round(e.retry_after_s or 1)))
                err = ApiError(
                    429,
                    "every replica is full and the cluster's queue is at its cap; retry later",
                    code="cluster_full",
                    headers={"Retry-After": retry},
                )
                return error_response(err)
            except LOST as e:
                cancel(gen)
                self.metrics.resent.inc()
                log.warning("replica lost before answering (attempt %d): %s", attempt + 1, e)
                continue
            except BaseException:
                cancel(gen)  # the client left (handler cancelled): the replica's request ends too
                raise
            assert isinstance(start, Start)
            return await self._respond(start, gen)
        self.metrics.rejected.labels("replicas_lost").inc()
        err = ApiError(503, "the replicas died under this request; retry", code="replica_lost")
        return error_response(err)

    async def _respond(self, start: Start, gen: Any) -> Response:
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in start.headers
            if k.lower() != b"content-length"
        }
        if not headers.get("content-type", "").startswith("text/event-stream"):
            chunks = [start.body]
            try:
                async for item in gen:
                    chunks.append(item)
            finally:
                cancel(gen)
            return Response(b"".join(chunks), start.status, headers)

        async def relay() -> AsyncIterator[bytes]:
            try:
                if start.body:
                    yield start.body
                async for item in gen:
                    yield item
            except LOST:
                self.metrics.rejected.labels("replica_lost_streaming").inc()
                err = ApiError(502, "the replica serving this stream died", code="replica_lost")
                yield (sse_error(err) + DONE).encode()
            finally:
                cancel(gen)

        async def closed() -> None:
            cancel(gen)  # already done by relay's own end; a stream that never began ends here

        # SSEResponse, not Starlette's StreamingResponse: one watcher task for the client's disconnect
        # instead of an anyio task group per stream (uvicorn speaks ASGI 2.3), as in server and gateway.
        return SSEResponse(relay(), headers, closed)

    # --- tracing -----------------------------------------------------------------------------------

    def _span(self, request: Request) -> Any:
        if self.tracer is None:
            return None
        from opentelemetry import propagate

        parent = propagate.extract(request.headers)
        return self.tracer.start_span("ingress", context=parent, attributes={"http.route": request.url.path})

    @staticmethod
    def _inject(span: Any, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers with its trace context replaced by the ingress span's."""
        from opentelemetry import propagate, trace

        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        names = {k.encode() for k in carrier}
        kept = [(k, v) for k, v in headers if k.lower() not in names]
        return kept + [(k.encode(), v.encode()) for k, v in carrier.items()]

    # --- one scrape for the whole cluster -------------------------------------------------------------

    async def replica_names(self) -> list[str]:
        """The replicas the router knows now (its first call creates it: one unpinned call does)."""
        if self.deployment not in LIVE:
            await self.replicas.state.remote()
        router = LIVE.get(self.deployment)
        return router.replica_names() if router is not None else []

    async def scrape(self, request: Request) -> Response:
        """Every replica's metrics with a `replica` label, then the ingress's own."""
        names = await self.replica_names()

        texts = []
        for name in names:  # one at a time: a few ms each, and a stuck replica costs only its timeout
            try:
                texts.append(await asyncio.wait_for(self.replicas.metrics.remote(pin=name), SCRAPE_TIMEOUT))
            except Exception:
                self.metrics.scrape_errors.inc()
        self.metrics.replicas.set(len(names))
        body = await asyncio.to_thread(merge, texts)
        return Response(body + self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def replica_states(self) -> list[dict[str, Any]]:
        """Every replica's `state()` (tests and benchmarks call this through a handle)."""
        states = []
        for name in await self.replica_names():
            with contextlib.suppress(Exception):
                states.append(await asyncio.wait_for(self.replicas.state.remote(pin=name), SCRAPE_TIMEOUT))
        return states
