"""The gateway's HTTP front: the OpenAI routes over the pools of `tailserve.routing` policy.

A request passes: API key → body size and JSON → the fields routing reads (400 naming a bad one) →
the model (404 if unknown) → the attempt loop, which ends in a whole answer or a committed stream.
The client leaving at any point cancels the attempt in flight and closes its upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from tailserve.api.errors import ApiError, error_response, install_error_handlers
from tailserve.api.http import parse_json, require_key, validate
from tailserve.api.ids import HEADER as REQUEST_ID
from tailserve.api.ids import request_id
from tailserve.api.openapi import documented_app
from tailserve.api.protocol import RoutingFields
from tailserve.api.sse import SSE_TYPE, STREAM_HEADERS
from tailserve.gateway.attempts import Answer, Attempts, Call
from tailserve.gateway.config import GatewayConfig
from tailserve.gateway.front import Front, Incoming, Stream, Whole, error_whole
from tailserve.gateway.groups import Groups
from tailserve.gateway.hedge import Hedger
from tailserve.gateway.metrics import NO_BACKEND, GatewayMetrics
from tailserve.gateway.policy_metrics import PolicyMetrics
from tailserve.gateway.relay import Relay
from tailserve.gateway.tracing import GatewayTracing, end_span, passthrough
from tailserve.gateway.upstream import Pool, poll_loads
from tailserve.routing.affinity import affinity_key

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tailserve.gateway")
SESSION_HEADER = "x-session-id"


class Gateway:
    """The state behind the routes: pools by public model, the attempt loop, metrics, tracing."""

    def __init__(
        self, config: GatewayConfig, pools: dict[str, Pool], tracer_provider: TracerProvider | None = None
    ) -> None:
        self.config = config
        self.pools = pools
        self.created = int(time.time())
        self.metrics = GatewayMetrics(self.backends, self.decisions)
        self.tracing = GatewayTracing(tracer_provider) if tracer_provider is not None else None
        policy_metrics = PolicyMetrics(self.metrics.registry)
        hedges = {m: s.hedge for m, s in config.models.items() if s.hedge is not None}
        self.hedger = Hedger(hedges, policy_metrics)
        self.attempts = Attempts(pools, config.retry, self.metrics, self.tracing, hedger=self.hedger)
        self.groups = Groups(config, pools, self.hedger, policy_metrics)
        self._poller: asyncio.Task[None] | None = None

    def backends(self) -> list[tuple[str, str, object]]:
        return [(p.name, u.name, u.backend) for p in self.pools.values() for u in p.upstreams.values()]

    def decisions(self) -> list[tuple[str, dict[str, int]]]:
        return [(p.name, dict(p.chooser.decisions)) for p in self.pools.values()]

    def start(self) -> None:
        ups = [u for p in self.pools.values() for u in p.upstreams.values()]
        self._poller = asyncio.get_running_loop().create_task(poll_loads(ups, self.config.poll_interval))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        clients = {id(u.client): u.client for p in self.pools.values() for u in p.upstreams.values()}
        for client in clients.values():
            await client.aclose()
        if self.tracing is not None:
            self.tracing.provider.force_flush()

    def ready(self) -> list[str]:
        """Models none of whose backends (nor fallbacks') takes a request now."""
        now = time.monotonic()

        def serves(model: str) -> bool:
            return any(u.backend.available(now) for u in self.pools[model].upstreams.values())

        return [m for m, p in self.pools.items() if not (serves(m) or any(serves(f) for f in p.fallback))]

    def model_cards(self) -> list[dict[str, Any]]:
        return [
            {"id": m, "object": "model", "created": self.created, "owned_by": "tailserve-gateway"}
            for m in [*self.pools, *self.groups.groups]
        ]

    async def serve(self, call: Call, headers: Mapping[str, str]) -> tuple[Answer | Relay, dict[str, str]]:
        """`call` through its group's tier policies, or straight to the attempt loop."""
        if call.model in self.groups:
            return await self.groups.run(call, headers, self.attempts)
        return await self.attempts.run(call), {}


def build_front(gateway: Gateway) -> Front:
    """The gateway's server: the completion routes answered by `front` itself, the rest by a FastAPI app."""
    app = documented_app("tailserve gateway", lambda: list(gateway.pools))
    app.state.gateway = gateway
    install_error_handlers(app, log)
    key = gateway.config.api_key

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        down = gateway.ready()
        if down:
            return error_response(
                ApiError(503, f"no backend takes requests for: {', '.join(down)}", code="not_ready")
            )
        return JSONResponse({"status": "ready", "models": list(gateway.pools)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            require_key(request.headers, key)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": gateway.model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        try:
            require_key(request.headers, key)
            card = next((c for c in gateway.model_cards() if c["id"] == model_id), None)
            if card is None:
                raise ApiError(
                    404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
                )
        except ApiError as e:
            return error_response(e)
        return JSONResponse(card)

    async def chat_completions(request: Incoming) -> Whole | Stream:
        return await _handle(gateway, request, "/chat/completions", "chatcmpl-")

    async def completions(request: Incoming) -> Whole | Stream:
        return await _handle(gateway, request, "/completions", "cmpl-")

    routes = {"/v1/chat/completions": chat_completions, "/v1/completions": completions}
    return Front(app, routes, gateway.config.max_body_bytes)


async def run_gateway(gateway: Gateway, stop: asyncio.Event, **serve: Any) -> None:
    """Serve `gateway` until `stop` is set (`serve`: Front.serve's address and hooks); its load poller
    runs meanwhile, and its connection pools close at the end. With `cpus` configured, the calling
    thread (the event loop's) and the threads it starts from then on are pinned to them."""
    if gateway.config.cpus:
        os.sched_setaffinity(0, gateway.config.cpus)
        log.info("gateway pinned to CPUs %s", ",".join(map(str, gateway.config.cpus)))
    gateway.start()
    try:
        await build_front(gateway).serve(stop, **serve)
    finally:
        await gateway.close()


async def _handle(gw: Gateway, request: Incoming, route: str, prefix: str) -> Whole | Stream:
    arrival = time.monotonic()
    rid, _ = request_id(request.headers, prefix)
    span = gw.tracing.request_span("/v1" + route, request.headers, rid) if gw.tracing is not None else None
    model = ""
    handed_off = False
    status: int | None = None
    try:
        require_key(request.headers, gw.config.api_key)
        raw = request.body
        raw_obj = parse_json(raw)
        fields = validate(raw_obj, RoutingFields)
        if fields.model not in gw.pools and fields.model not in gw.groups:
            raise ApiError(
                404,
                f"the model {fields.model!r} does not exist; this gateway serves "
                f"{', '.join(map(repr, [*gw.pools, *gw.groups.groups]))}",
                param="model",
                code="model_not_found",
            )
        model = fields.model
        headers = {REQUEST_ID: rid}
        if gw.tracing is None:
            headers |= passthrough(request.headers)
        call = Call(
            route=route,
            raw=raw,  # as the client sent it: a backend that needs no change gets these bytes
            body=raw_obj,
            model=model,
            stream=fields.stream,
            deadline=arrival + (fields.timeout or gw.config.deadline),
            key=affinity_key(raw_obj, request.headers.get(SESSION_HEADER)),
            headers=headers,
            span=span,
        )
        result, said = await gw.serve(call, request.headers)
        if isinstance(result, Relay):
            status = 200
            gw.metrics.requests.labels(model, result.upstream.name, "200").inc()
            relay = result

            async def on_close() -> None:
                await relay.close()
                end_span(span, 200, None if relay.outcome != "failure" else relay.label)

            handed_off = True
            headers = {**STREAM_HEADERS, "content-type": SSE_TYPE, **said, REQUEST_ID: rid}
            return Stream(headers, relay.body(), on_close)
        status = result.status
        gw.metrics.requests.labels(model, result.backend, str(status)).inc()
        return Whole(status, {**result.headers, **said, REQUEST_ID: rid}, result.body)
    except ApiError as e:
        status = e.status
        gw.metrics.requests.labels(model or "unknown", NO_BACKEND, str(status)).inc()
        return error_whole(e, rid)
    except asyncio.CancelledError:
        if request.disconnected():
            status = 499  # the client left: its attempt has closed the upstream connection
        raise
    finally:
        if not handed_off:
            end_span(span, status, None if status is not None and status < 400 else str(status))
