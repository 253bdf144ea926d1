"""The state behind the server's routes, and the checks a request passes before the engine sees it."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from tailserve.api.errors import ApiError
from tailserve.api.http import read_json, require_key, validate
from tailserve.api.protocol import ChatCompletionRequest, CompletionRequest
from tailserve.config import ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.obs.observer import Observer
from tailserve.server.admission import Admission, Limits, Rejected, Ticket, estimate_tokens
from tailserve.server.faults import Stall
from tailserve.server.generation import Generation
from tailserve.structured.grammar import Grammar, GrammarError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

# Prompts longer than this are tokenized on a worker thread. It keeps the event loop accepting only
# while the tokenizer releases the GIL (`tokenizers`' encode_batch does; its encode does not).
THREAD_TOKENIZE_CHARS = 16_384
SHUTDOWN_MESSAGE = "the server is shutting down"

R = TypeVar("R", bound=ChatCompletionRequest | CompletionRequest)


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
        engine.max_buffered = config.stream_buffer
        self._serial = itertools.count()
        self.obs = Observer(config, model_name, engine, tracer_provider)
        self.stall = Stall(config.stall_share, config.stall_seconds)

    def engine_request_id(self, rid: str, client_chose: bool) -> str:
        """A client's X-Request-ID plus a serial number, so engine ids never repeat: a client retrying
        with the id of a request it just abandoned must not meet that request's abort in the engine."""
        return f"{rid}#{next(self._serial)}" if client_chose else rid

    def model_card(self) -> dict[str, Any]:
        """The served model as /v1/models lists it."""
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tailserve",
            "max_model_len": self.engine.max_model_len,
        }

    # --- the request path ------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        require_key(request.headers, self.admission.api_key)

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
        """The body, after the injected stall when one is configured (a request's first await)."""
        await self.stall.maybe()
        return await read_json(request, self.config.max_body_bytes)

    def parse(self, obj: Any, cls: type[R]) -> R:
        req = validate(obj, cls)
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

    async def compile_grammar(self, req: ChatCompletionRequest | CompletionRequest) -> Grammar | None:
        """The request's response_format compiled to a grammar; a 400 saying why it cannot be."""
        spec = req.grammar_spec()
        if spec is None:
            return None
        try:
            return await self.engine.compile_grammar(spec)
        except GrammarError as e:
            param = "response_format" if req.response_format else "tools"
            raise ApiError(400, str(e), param=param, code="invalid_value") from None

    def admit(
        self, count: int, num_prompts: int, num_chars: int, known_tokens: int, timeout: float | None
    ) -> Ticket:
        """Reserve `count` engine requests, each with the mean prompt size estimated from the text."""
        total = known_tokens + (estimate_tokens(num_chars) if num_chars else 0)
        try:
            return self.admission.admit(self.engine.stats, count, -(-total // num_prompts), timeout)
        except Rejected as r:
            raise rejected(r) from None

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


def rejected(r: Rejected) -> ApiError:
    """Admission's refusal as the error answered (429/503 with Retry-After when it names one)."""
    headers = {"Retry-After": str(r.retry_after)} if r.retry_after is not None else None
    return ApiError(r.status, r.message, code=r.code, headers=headers)
