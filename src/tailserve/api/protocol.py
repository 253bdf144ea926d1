"""The OpenAI wire format: request bodies (validated with pydantic) and response shapes.

Requests are pydantic models so a bad field becomes a 400 naming it. Responses are built as plain
dicts of the TypedDict shapes below: one SSE chunk per engine step must cost microseconds, and the
shapes still document what the official client reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from tailserve.api.errors import ApiError
from tailserve.sampling import SamplingParams
from tailserve.structured import tools as tool_calls
from tailserve.structured.grammar import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from tailserve.engine.outputs import TokenLogprob

MAX_N = 16
MAX_TOP_LOGPROBS = 20

# --- requests --------------------------------------------------------------------------------------


# A request's `timeout` longer than a day is a mistake, not a deadline: it is refused (400), so no
# deadline arithmetic meets a number it cannot turn into milliseconds (1e308 s overflowed the gateway).
MAX_TIMEOUT = 86_400.0


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both endpoints: OpenAI's, then the extensions vLLM users know."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    priority: int = 0
    timeout: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT)  # seconds from arrival; overdue: aborted
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> ApiError | None:
        """A 400 for parameters the engine cannot honour, rather than silently ignoring them."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return ApiError(400, f"{name} is not supported (only 0)", param=name, code="unsupported")
        if self.logit_bias:
            return ApiError(400, "logit_bias is not supported", param="logit_bias", code="unsupported")
        return None

    def grammar_spec(self) -> GrammarSpec | None:
        """What `response_format` constrains the output to (None: free text).

        `strict` is accepted either way and changes nothing: the output always follows the schema, and
        a schema the grammar cannot enforce is refused, never loosened."""
        rf = self.response_format
        if rf is None:
            return None
        kind = rf.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return GrammarSpec.json_object()
        if kind != "json_schema":
            raise ApiError(
                400,
                f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                param="response_format",
                code="invalid_value",
            )
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) or "schema" not in js:
            raise ApiError(
                400,
                "response_format json_schema needs {'name': str, 'schema': {...}}",
                param="response_format.json_schema",
                code="invalid_value",
            )
        try:
            return GrammarSpec.json_schema(js["schema"])
        except GrammarError as e:
            raise ApiError(
                400, str(e), param="response_format.json_schema.schema", code="invalid_value"
            ) from None

    def sampling_params(self, max_tokens: int, logprobs: int | None, seed_offset: int = 0) -> SamplingParams:
        """Engine parameters for one choice; n > 1 offsets the seed so choices differ reproducibly."""
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_plan(self) -> tool_calls.ToolPlan | None:
        """The validated tools and tool_choice (None: no tools)."""
        try:
            return tool_calls.plan(self.tools, self.tool_choice, self.parallel_tool_calls)
        except tool_calls.ToolError as e:
            raise ApiError(400, str(e), param=e.param, code="invalid_value") from None

    def grammar_spec(self) -> GrammarSpec | None:
        """A required or named tool call constrains the output to the call's JSON; `auto` (without a
        response_format, which then wins) to free text or the call's JSON (tools.auto_grammar)."""
        plan = self.tool_plan()
        if plan is not None and plan.choice == "auto" and super().grammar_spec() is None:
            return GrammarSpec.lark(tool_calls.auto_grammar(plan))
        if plan is None or not plan.constrained:
            return super().grammar_spec()
        if super().grammar_spec() is not None:
            raise ApiError(
                400,
                "response_format cannot be combined with a required or named tool_choice",
                param="response_format",
                code="invalid_value",
            )
        try:
            return GrammarSpec.json_schema(tool_calls.call_schema(plan))
        except GrammarError as e:
            raise ApiError(400, str(e), param="tools", code="invalid_value") from None

    def prompt_messages(
        self, template: tool_calls.TemplateTools
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages to render and extra template variables: tools and earlier calls as the
        template takes them (tools.render)."""
        return tool_calls.render(self.messages, self.tool_plan(), template)

    def unsupported(self) -> ApiError | None:
        if self.top_logprobs is not None and not self.logprobs:
            return ApiError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
            )
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def text_length(self) -> int:
        """Characters of message text: the cheap size estimate admission uses before tokenizing."""
        total = 0
        for m in self.messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
        return total


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_Common):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's documented default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> ApiError | None:
        if self.echo:
            return ApiError(400, "echo is not supported", param="echo", code="unsupported")
        if self.suffix:
            return ApiError(400, "suffix is not supported", param="suffix", code="unsupported")
        if self.best_of is not None and self.best_of != self.n:
            return ApiError(400, "best_of other than n is not supported", param="best_of", code="unsupported")
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a string, or token ids), each non-empty."""
        p = self.prompt
        single = isinstance(p, str) or (p and isinstance(p[0], int))
        items: list[str | list[int]] = [p] if single else list(p)  # type: ignore[list-item]
        if not items or any(len(x) == 0 for x in items):
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return items


class RoutingFields(BaseModel):
    """What a gateway reads of a chat or completion request to route it. Everything else in the body
    passes through to the backend untouched (a backend may support more than tailserve does)."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    timeout: float | None = Field(None, gt=0.0, le=MAX_TIMEOUT)  # seconds; one deadline for all attempts
    user: str | None = None


# --- responses -------------------------------------------------------------------------------------


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


FinishReason = Literal["stop", "length", "abort"]


class ChatChoice(TypedDict):
    index: int
    message: dict[str, Any]  # {"role": "assistant", "content": str}
    logprobs: dict[str, Any] | None  # {"content": [chat_logprob(...), ...]}
    finish_reason: FinishReason | None
    stop_reason: str | int | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: dict[str, Any] | None  # completion_logprobs(...)
    finish_reason: FinishReason | None
    stop_reason: str | int | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def _finite(logprob: float) -> float:
    """OpenAI's floor for impossible tokens: JSON has no -Infinity."""
    return max(logprob, -9999.0)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": _finite(logprob),
        "bytes": list(token.encode("utf-8", errors="replace")),
    }


def chat_logprobs(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` entries: the sampled token and its top alternatives."""
    return [
        {**_entry(t.token, t.logprob), "top_logprobs": [_entry(text, lp) for _, text, lp in t.top]}
        for t in items
    ]


def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; `text_offset` counts from `offset` characters into the output."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [_finite(t.logprob) for t in items],
        "top_logprobs": [{text: _finite(lp) for _, text, lp in t.top} for t in items],
        "text_offset": offsets,
    }
