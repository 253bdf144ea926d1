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
import contextlib
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tailserve.config import ServerConfig
from tailserve.engine.engine import AsyncEngine
from tailserve.engine.outputs import RequestOutput, TokenLogprob
from tailserve.obs.observer import Observer
from tailserve.sampling import SamplingParams
from tailserve.server.admission import Admission, Limits, Rejected, Ticket, estimate_tokens
from tailserve.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
    validation_error,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tailserve.server")

# Prompts longer than this are tokenized on a worker thread. It keeps the event loop accepting only
# while the tokenizer releases the GIL (`tokenizers`' encode_batch does; its encode does not).
THREAD_TOKENIZE_CHARS = 16_384
SHUTDOWN_MESSAGE = "the server is shutting down"

R = TypeVar("R", bound=ChatCompletionRequest | CompletionRequest)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class SubRequest:
    """One engine request: one prompt, one choice."""

    engine_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Choice:
    """What a non-streaming answer accumulates for one choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: RequestOutput | None = None


class Generation:
    """The engine requests behind one HTTP request (prompts × n), merged into one stream of deltas.

    Every exit path ends in `aclose`, which aborts what is unfinished (freeing its KV blocks within one
    engine step) and releases the admission ticket exactly once.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        ticket: Ticket,
        subs: list[SubRequest],
        live: dict[str, Generation],
        *,
        priority: int,
        arrival: float,
        deadline: float | None,
    ) -> None:
        self.engine = engine
        self.ticket = ticket
        self.engine_ids = [s.engine_id for s in subs]
        self.deadline = deadline
        self.abort_reason: str | None = None
        self._gens = [
            engine.generate(
                s.prompt_ids, s.params, s.engine_id, priority=priority, arrival=arrival, deadline=deadline
            )
            for s in subs
        ]
        self._iter: AsyncIterator[tuple[int, RequestOutput]] | None = None
        self.outputs: list[RequestOutput | None] = [None] * len(subs)  # each choice's latest delta
        self._live = live
        self._closed = False
        live.update(dict.fromkeys(self.engine_ids, self))

    def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The one stream of (sub-request index, delta); iterate it once."""
        assert self._iter is None
        self._iter = self._merge() if len(self._gens) > 1 else self._single()
        return self._iter

    async def _single(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        gen = self._gens[0]
        try:
            async for out in gen:
                self._track(0, out)
                yield 0, out
        finally:
            await gen.aclose()

    async def _merge(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self._gens)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                self._track(i, item)
                remaining -= item.finished
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in self._gens:
                await g.aclose()  # type: ignore[attr-defined]

    def _track(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out
        if out.finished:
            self.ticket.finished(i)
        else:
            self.ticket.started(i)

    def timed_out(self, out: RequestOutput) -> bool:
        return (
            out.finish_reason == "abort"
            and self.deadline is not None
            and time.perf_counter() >= self.deadline
        )

    def abort(self, reason: str) -> None:
        """End every choice now (graceful shutdown past its grace period)."""
        self.abort_reason = reason
        for eid in self.engine_ids:
            self.engine.abort(eid)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._iter is not None:
                with contextlib.suppress(RuntimeError):  # still running in a task being cancelled
                    await self._iter.aclose()  # type: ignore[attr-defined]
            else:
                for g in self._gens:
                    await g.aclose()  # type: ignore[attr-defined]
        finally:
            if not self.ticket.done:
                for eid in self.engine_ids:
                    self.engine.abort(eid)
            self.ticket.release()
            for eid in self.engine_ids:
                self._live.pop(eid, None)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that closes its Generation on every exit, even if it never started streaming,
    then calls `on_close` (the observer's end of the request)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        generation: Generation,
        headers: dict[str, str],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.generation = generation
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(RuntimeError):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.generation.aclose()
            if self.on_close is not None:
                self.on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, aw: Awaitable[Any]) -> Any:
    """Await `aw`, cancelling it (and so aborting its engine requests) if the client leaves first."""
    work = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))
    if work.cancelled():
        raise ClientGone
    return work.result()


class OpenAIServer:
    """The state behind the routes: the engine, the admission counters, the live generations, the observer."""

    def __init__(
        self,
        engine: AsyncEngine,
        config: ServerConfig,
        model_name: str,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.created = int(time.time())
        ec = engine.engine.config
        self.admission = Admission(
            Limits(
                max_num_seqs=ec.max_num_seqs,
                max_num_batched_tokens=ec.max_num_batched_tokens,
                max_queue=config.max_queue,
                max_queue_tokens=config.max_queue_tokens,
                max_queue_wait=config.max_queue_wait,
                request_timeout=config.request_timeout,
            ),
            api_key=config.api_key,
        )
        self.live: dict[str, Generation] = {}  # by engine request id
        self._serial = itertools.count()
        self.obs = Observer(config, model_name, engine, tracer_provider)

    def engine_request_id(self, rid: str, client_chose: bool) -> str:
        """A client's X-Request-ID plus a serial number, so engine ids never repeat: a client retrying
        with the id of a request it just abandoned must not meet that request's abort in the engine."""
        return f"{rid}#{next(self._serial)}" if client_chose else rid

    # --- the request path ------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if not self.admission.authorized(request.headers.get("authorization")):
            raise ApiError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    def check_open(self) -> None:
        if self.admission.draining:
            raise ApiError(
                503,
                SHUTDOWN_MESSAGE + " and admits no new requests",
                code="draining",
                headers={"Retry-After": "5"},
            )
        if not self.engine.alive:
            raise ApiError(503, "the engine is not running", code="not_ready")

    async def read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(
            413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def parse(self, obj: Any, cls: type[R]) -> R:
        if not isinstance(obj, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = cls.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        err = req.unsupported()
        if err is not None:
            raise err
        return req

    def admit(
        self, count: int, num_prompts: int, num_chars: int, known_tokens: int, timeout: float | None
    ) -> Ticket:
        """Reserve `count` engine requests, each with the mean prompt size estimated from the text."""
        total = known_tokens + (estimate_tokens(num_chars) if num_chars else 0)
        try:
            return self.admission.admit(self.engine.stats, count, -(-total // num_prompts), timeout)
        except Rejected as r:
            raise _rejected(r) from None

    async def tokenize(self, text: str) -> list[int]:
        encode = self.engine.tokenizer.encode
        if len(text) > THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(encode, text)
        return encode(text)

    def check_context(self, num_prompt: int, max_tokens: int | None, what: str) -> int:
        """max_tokens to run with: the requested one, or all the context left; 400 with the counts if over."""
        ctx = self.engine.max_model_len
        if max_tokens is None:
            if num_prompt < ctx:
                return ctx - num_prompt
            msg = (
                f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in "
                f"{num_prompt} tokens, leaving none to generate. Please reduce the length of the {what}."
            )
        elif num_prompt + max_tokens <= ctx:
            return max_tokens
        else:
            msg = (
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion."
            )
        raise ApiError(400, msg, param=what, code="context_length_exceeded")


def _rejected(r: Rejected) -> ApiError:
    headers = {"Retry-After": str(r.retry_after)} if r.retry_after is not None else None
    return ApiError(r.status, r.message, code=r.code, headers=headers)


def _error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_app(
    engine: AsyncEngine,
    config: ServerConfig,
    model_name: str,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; `app.state.server` is its OpenAIServer.
    `tracer_provider` turns tracing on with that provider (else `config.otel_exporter` decides)."""
    server = OpenAIServer(engine, config, model_name, tracer_provider)
    app = FastAPI(title="tailserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(
            ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return _error_response(ApiError(503, "the engine thread has stopped", code="engine_dead"))
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            server.check_open()
        except ApiError as e:
            return _error_response(e)
        return JSONResponse({"status": "ready", "model": model_name})

    metrics = server.obs.metrics
    if metrics is not None:

        @app.get("/metrics")
        async def prometheus() -> Response:
            # Rendering takes milliseconds: off the event loop, so streams keep flowing during a scrape.
            body = await asyncio.to_thread(metrics.render)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "tailserve",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            server.check_auth(request)
        except ApiError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        try:
            server.check_auth(request)
            if model_id != model_name:
                raise ApiError(
                    404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
                )
        except ApiError as e:
            return _error_response(e)
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(server, request, ChatCompletionRequest, "chatcmpl-")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(server, request, CompletionRequest, "cmpl-")

    return app


async def _handle(server: OpenAIServer, request: Request, cls: type[R], prefix: str) -> Response:
    arrival, created = time.perf_counter(), int(time.time())
    generated = prefix + uuid.uuid4().hex
    rid = request.headers.get("x-request-id") or generated
    obs = server.obs
    record = obs.start(request, rid, arrival)
    ticket: Ticket | None = None
    gen: Generation | None = None
    handed_off = False
    try:
        server.check_auth(request)
        server.check_open()
        req = server.parse(await server.read_json(request), cls)
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
                text = server.engine.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True)
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
            raise _rejected(r) from None

        subs = []
        many = len(prompt_ids) * req.n > 1
        base = server.engine_request_id(rid, client_chose=rid != generated)
        for p, ids in enumerate(prompt_ids):
            mt = server.check_context(len(ids), max_tokens, what)
            for i in range(req.n):
                index = p * req.n + i
                try:
                    params = req.sampling_params(mt, logprobs, seed_offset=i)
                except ValueError as e:
                    raise ApiError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None
                subs.append(SubRequest(f"{base}-{index}" if many else base, ids, params))

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
            first = await _unless_disconnected(request, events.__anext__())
        except ValueError as e:  # the engine's own input checks, made before it queues anything
            raise ApiError(400, str(e), param=what, code="invalid_value") from None
        if len(subs) == 1 and first[1].finished and (err := _finish_error(gen, first[1])) is not None:
            raise err  # failed before its first token: a status code, even for a stream
        if req.stream:
            headers = {"X-Request-ID": rid, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            response: Response = SSEResponse(
                _stream(server, req, gen, events, first, rid, created),
                gen,
                headers,
                None if record is None else functools.partial(obs.submit, record),
            )
            handed_off = True  # the response closes the generation when the stream ends
            return response
        body = await _unless_disconnected(request, _collect(server, req, gen, events, first, rid, created))
        return JSONResponse(body, headers={"X-Request-ID": rid})
    except ApiError as e:
        obs.rejected(record, e.status, e.code)
        return _error_response(e, rid)
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


def _finish_error(gen: Generation, out: RequestOutput) -> ApiError | None:
    """Why a choice ended without stop/length, as the error its client should see."""
    if out.finish_reason == "error":
        return ApiError(500, out.error or "engine error", code="engine_error")
    if out.finish_reason != "abort":
        return None
    if gen.timed_out(out):
        return ApiError(504, out.error or "the request ran past its timeout", code="deadline_exceeded")
    if gen.abort_reason is not None:
        return ApiError(503, gen.abort_reason, code="draining")
    return None


async def _collect(
    server: OpenAIServer,
    req: ChatCompletionRequest | CompletionRequest,
    gen: Generation,
    events: AsyncIterator[tuple[int, RequestOutput]],
    first: tuple[int, RequestOutput],
    rid: str,
    created: int,
) -> dict[str, Any]:
    choices = [Choice() for _ in gen.engine_ids]

    def add(i: int, out: RequestOutput) -> None:
        c = choices[i]
        c.text.append(out.new_text)
        if out.logprobs:
            c.logprobs.extend(out.logprobs)
        if out.finished:
            c.final = out

    add(*first)
    async for i, out in events:
        add(i, out)
    finals = [c.final for c in choices]
    assert all(f is not None for f in finals)
    for f in finals:
        err = _finish_error(gen, f)  # type: ignore[arg-type]
        if err is not None:
            raise err
    chat = isinstance(req, ChatCompletionRequest)
    body_choices = []
    for i, c in enumerate(choices):
        f = c.final
        assert f is not None
        text = "".join(c.text)
        lp: dict[str, Any] | None = None
        if chat and req.logprobs:
            lp = {"content": chat_logprobs(c.logprobs)}
        elif not chat and req.logprobs is not None:
            lp = completion_logprobs(c.logprobs, 0)
        entry: dict[str, Any] = {"index": i}
        if chat:
            entry["message"] = {"role": "assistant", "content": text}
        else:
            entry["text"] = text
        entry |= {"logprobs": lp, "finish_reason": f.finish_reason, "stop_reason": f.stop_reason}
        body_choices.append(entry)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": server.model_name,
        "choices": body_choices,
        "usage": _usage(finals, req.n),  # type: ignore[arg-type]
    }


def _usage(finals: list[RequestOutput], n: int) -> dict[str, Any]:
    """Each prompt counted once (its first choice), every choice's completion tokens."""
    firsts = finals[::n]
    return dict(
        usage(
            sum(f.num_prompt_tokens for f in firsts),
            sum(f.num_output_tokens for f in finals),
            sum(f.num_cached_tokens for f in firsts),
        )
    )


async def _stream(
    server: OpenAIServer,
    req: ChatCompletionRequest | CompletionRequest,
    gen: Generation,
    events: AsyncIterator[tuple[int, RequestOutput]],
    first: tuple[int, RequestOutput],
    rid: str,
    created: int,
) -> AsyncIterator[str]:
    """One SSE event per engine delta that carries text (or ends a choice), then usage, then [DONE]."""
    chat = isinstance(req, ChatCompletionRequest)
    k = len(gen.engine_ids)
    head = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": server.model_name,
    }
    pending: list[list[TokenLogprob]] = [[] for _ in range(k)]
    offsets = [0] * k
    finals: list[RequestOutput | None] = [None] * k
    want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None

    def chunk(i: int, out: RequestOutput) -> str | None:
        if out.logprobs:
            pending[i].extend(out.logprobs)
        if not out.new_text and not out.finished:
            return None  # nothing to show yet (a partial character, or text held back for a stop string)
        lp: dict[str, Any] | None = None
        if want_logprobs:
            lp = (
                {"content": chat_logprobs(pending[i])}
                if chat
                else completion_logprobs(pending[i], offsets[i])
            )
        pending[i] = []
        offsets[i] += len(out.new_text)
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice["delta"] = {"content": out.new_text} if out.new_text else {}
        else:
            choice["text"] = out.new_text
        choice |= {"logprobs": lp, "finish_reason": out.finish_reason if out.finished else None}
        if out.finished:
            finals[i] = out
            choice["stop_reason"] = out.stop_reason
        return _sse({**head, "choices": [choice]})

    error: ApiError | None = None
    if chat:
        for i in range(k):
            role = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield _sse({**head, "choices": [role]})
    i, out = first
    while True:
        text = chunk(i, out)
        if text is not None:
            yield text
        if out.finished and error is None:
            error = _finish_error(gen, out)
        try:
            i, out = await events.__anext__()
        except StopAsyncIteration:
            break
    if error is not None:
        yield _sse(error.body())
    elif req.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(finals, req.n)})  # type: ignore[arg-type]
    yield "data: [DONE]\n\n"
