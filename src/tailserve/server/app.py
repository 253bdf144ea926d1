"""The OpenAI-compatible HTTP front: routes, admission, SSE streaming, disconnect → abort.

A request passes, cheapest check first: API key → draining → body size → JSON and fields → model →
admission caps (counters only) → tokenization → context length → the engine. The engine runs on its
own thread (`AsyncEngine`); this event loop only parses, admits, and forwards deltas.

Responses wait for the engine's first delta before sending headers, so a request that fails before
its first token (bad input the engine caught, deadline passed in the queue) still gets a proper
status code; a client sees the headers and the first token together, which costs TTFT nothing.

Deadlines (`timeout` in the body, or `--request-timeout`): overdue work is aborted in the engine.
Non-streaming, the answer is 504 `deadline_exceeded`; streaming, the stream ends with a chunk whose
finish_reason is "abort", then `data: {"error": {...}}`, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tailserve.api.errors import ApiError, error_response, install_error_handlers
from tailserve.api.http import CancelOnDisconnect, ClientGone
from tailserve.api.ids import request_id
from tailserve.api.openapi import route, served_app
from tailserve.api.protocol import ChatCompletionRequest, CompletionRequest
from tailserve.api.sse import SSEResponse
from tailserve.config import ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.server.admission import Rejected, Ticket
from tailserve.server.generation import Generation, SubRequest
from tailserve.server.load import install_load
from tailserve.server.responses import collect, finish_error, stream
from tailserve.server.state import OpenAIServer, R, rejected

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from starlette.applications import Starlette

log = logging.getLogger("tailserve.server")


def build_app(
    engine: AsyncEngine,
    config: ServerConfig,
    model_name: str,
    tracer_provider: TracerProvider | None = None,
) -> Starlette:
    """The Starlette app serving `engine` as `model_name`; `app.state.server` is its OpenAIServer.
    `tracer_provider` turns tracing on with that provider (else `config.otel_exporter` decides)."""
    server = OpenAIServer(engine, config, model_name, tracer_provider)
    app = served_app("tailserve", lambda: [model_name])
    app.state.server = server
    install_error_handlers(app, log)
    install_load(app, server)

    @route(app, "GET", "/health")
    async def health(request: Request) -> JSONResponse:
        if not engine.alive:
            return error_response(ApiError(503, "the engine thread has stopped", code="engine_dead"))
        return JSONResponse({"status": "ok"})

    @route(app, "GET", "/ready")
    async def ready(request: Request) -> JSONResponse:
        try:
            server.check_open()
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"status": "ready", "model": model_name})

    metrics = server.obs.metrics
    if metrics is not None:

        @route(app, "GET", "/metrics")
        async def prometheus(request: Request) -> Response:
            # Rendering takes milliseconds: off the event loop, so streams keep flowing during a scrape.
            body = await asyncio.to_thread(metrics.render)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    @route(app, "GET", "/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            server.check_auth(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [server.model_card()]})

    @route(app, "GET", "/v1/models/{model_id:path}")
    async def model(request: Request) -> JSONResponse:
        try:
            server.check_auth(request)
            if (model_id := request.path_params["model_id"]) != model_name:
                raise ApiError(
                    404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
                )
        except ApiError as e:
            return error_response(e)
        return JSONResponse(server.model_card())

    @route(app, "POST", "/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(server, request, ChatCompletionRequest, "chatcmpl-")

    @route(app, "POST", "/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(server, request, CompletionRequest, "cmpl-")

    return app


async def _handle(server: OpenAIServer, request: Request, cls: type[R], prefix: str) -> Response:
    arrival, created = time.perf_counter(), int(time.time())
    rid, client_chose = request_id(request.headers, prefix)
    obs = server.obs
    record = obs.start(request, rid, arrival)
    ticket: Ticket | None = None
    gen: Generation | None = None
    handed_off = False
    try:
        server.check_auth(request)
        server.check_open()
        req = server.parse(await server.read_json(request), cls)
        # Compiled (or found in the cache) before admission: the request holds no slot meanwhile.
        grammar = await server.compile_grammar(req)
        if record is not None and obs.log_prompts:
            record.prompt = req.messages if isinstance(req, ChatCompletionRequest) else req.prompt
        timeout = server.admission.timeout(req.timeout)
        prompts: list[str | list[int]] = []  # a chat request's one prompt is its rendered messages
        if isinstance(req, ChatCompletionRequest):
            chars = req.text_length()
        else:
            prompts = req.prompts()
            chars = sum(len(p) for p in prompts if isinstance(p, str))
        num_prompts = len(prompts) or 1
        known = sum(len(p) for p in prompts if isinstance(p, list))
        # Admission before tokenizing, on a size estimate; the exact count is checked again below.
        ticket = server.admit(num_prompts * req.n, num_prompts, chars, known, timeout)

        if isinstance(req, ChatCompletionRequest):
            try:
                tok = server.engine.tokenizer
                messages, extra = req.prompt_messages(tok.template_tools)
                text = tok.apply_chat_template(messages, add_generation_prompt=True, **extra)
            except ValueError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_value") from None
            prompt_ids = [await server.tokenize(text)]
            max_tokens, logprobs, what = req.requested_max_tokens, req.num_logprobs, "messages"
        else:
            prompt_ids = [p if isinstance(p, list) else await server.tokenize(p) for p in prompts]
            max_tokens, logprobs, what = req.max_tokens, req.logprobs, "prompt"
        try:
            ticket.resize(server.engine.stats, -(-sum(map(len, prompt_ids)) // num_prompts), timeout)
        except Rejected as r:
            raise rejected(r) from None

        subs = []
        many = len(prompt_ids) * req.n > 1
        base = server.engine_request_id(rid, client_chose)
        for p, ids in enumerate(prompt_ids):
            mt = server.check_context(len(ids), max_tokens, what)
            for i in range(req.n):
                index = p * req.n + i
                try:
                    params = req.sampling_params(mt, logprobs, seed_offset=i)
                except ValueError as e:
                    raise ApiError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None
                subs.append(SubRequest(f"{base}-{index}" if many else base, ids, params, grammar))

        gen = Generation(
            server.engine,
            ticket,
            subs,
            server.live,
            priority=req.priority,
            arrival=arrival,
            deadline=None if timeout is None else arrival + timeout,
        )
        if record is not None:
            record.outputs = gen.outputs
        events = gen.events()
        try:
            async with CancelOnDisconnect(request.receive):
                first = await events.__anext__()
        except ValueError as e:  # the engine's own input checks, made before it queues anything
            raise ApiError(400, str(e), param=what, code="invalid_value") from None
        if len(subs) == 1 and first[1].finished and (err := finish_error(gen, first[1])) is not None:
            raise err  # failed before its first token: a status code, even for a stream
        if req.stream:

            async def on_close(gen: Generation = gen) -> None:
                await gen.aclose()
                if record is not None:
                    obs.submit(record)

            response: Response = SSEResponse(
                stream(server, req, gen, events, first, rid, created), {"X-Request-ID": rid}, on_close
            )
            handed_off = True  # the response closes the generation when the stream ends
            return response
        async with CancelOnDisconnect(request.receive):
            body = await collect(server, req, gen, events, first, rid, created)
        return JSONResponse(body, headers={"X-Request-ID": rid})
    except ApiError as e:
        obs.rejected(record, e.status, e.code)
        return error_response(e, rid)
    except ClientGone:
        if record is not None:
            record.status = 499
        return Response(status_code=499)
    finally:
        if not handed_off:
            if gen is not None:
                await gen.aclose()
            elif ticket is not None:
                ticket.release()
            if record is not None:
                obs.submit(record)
