"""Engine deltas → OpenAI responses: the collected body of a non-streaming answer, and the SSE chunks
of a streaming one (one event per delta that carries text)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tailserve.api.errors import ApiError
from tailserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from tailserve.api.sse import DONE, sse, sse_error
from tailserve.engine.async_engine import SLOW_READER
from tailserve.engine.outputs import RequestOutput, TokenLogprob
from tailserve.server.generation import Generation
from tailserve.server.state import OpenAIServer
from tailserve.structured import tools as tool_calls


@dataclass
class Choice:
    """What a non-streaming answer accumulates for one choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: RequestOutput | None = None


def finish_error(gen: Generation, out: RequestOutput) -> ApiError | None:
    """Why a choice ended without stop/length, as the error its client should see."""
    if out.finish_reason == "error":
        return ApiError(500, out.error or "engine error", code="engine_error")
    if out.finish_reason != "abort":
        return None
    if gen.timed_out(out):
        return ApiError(504, out.error or "the request ran past its timeout", code="deadline_exceeded")
    if gen.abort_reason is not None:
        return ApiError(503, gen.abort_reason, code="draining")
    if out.error is not None and out.error.startswith(SLOW_READER):
        return ApiError(408, out.error, code="slow_reader")
    return None


async def collect(
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
        err = finish_error(gen, f)  # type: ignore[arg-type]
        if err is not None:
            raise err
    chat = isinstance(req, ChatCompletionRequest)
    plan = _active_plan(req)
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
        calls = tool_calls.parse_calls(text, plan) if plan is not None else None
        finish_reason = f.finish_reason
        if calls:
            entry["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            finish_reason = "tool_calls"
        elif chat:
            entry["message"] = {"role": "assistant", "content": text}
        else:
            entry["text"] = text
        entry |= {"logprobs": lp, "finish_reason": finish_reason, "stop_reason": f.stop_reason}
        body_choices.append(entry)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": server.model_name,
        "choices": body_choices,
        "usage": _usage(finals, req.n),  # type: ignore[arg-type]
    }


def _active_plan(req: ChatCompletionRequest | CompletionRequest) -> tool_calls.ToolPlan | None:
    """The tool plan when the answer may be a call (tools given, tool_choice not none)."""
    if not isinstance(req, ChatCompletionRequest):
        return None
    plan = req.tool_plan()
    return plan if plan is not None and plan.choice != "none" else None


def _tool_events(head: dict[str, Any], i: int, deltas: list[dict[str, Any]]) -> str:
    """Tool-call deltas (tools.CallScanner's) as SSE chunks of choice `i`."""
    return "".join(
        sse(
            {
                **head,
                "choices": [
                    {"index": i, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}
                ],
            }
        )
        for d in deltas
    )


def _whole_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls found only at the end (output the scanner could not follow), as opening + arguments deltas."""
    deltas: list[dict[str, Any]] = []
    for j, c in enumerate(calls):
        fn = c["function"]
        deltas.append(
            {"index": j, "id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
        )
        deltas.append({"index": j, "function": {"arguments": fn["arguments"]}})
    return deltas


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


async def stream(
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
    plan = _active_plan(req)
    # With tools, each choice's output is followed as it streams: a call's deltas go out as they
    # form; output that turns out to be text is released from then on.
    scanners = [tool_calls.CallScanner(plan) for _ in range(k)] if plan is not None else []

    def chunk(i: int, out: RequestOutput) -> str | None:
        if scanners and scanners[i].state != "text":
            scan = scanners[i]
            events = _tool_events(head, i, scan.feed(out.new_text))
            if scan.state == "text":
                out = dataclasses.replace(out, new_text=scan.buf)
            elif not out.finished:
                pending[i].extend(out.logprobs or [])
                return events or None
            else:
                whole = None if scan.calls else tool_calls.parse_calls(scan.buf, plan)  # type: ignore[arg-type]
                if not scan.calls and not whole:
                    out = dataclasses.replace(out, new_text=scan.buf)
                else:
                    finals[i] = out
                    if whole:
                        events += _tool_events(head, i, _whole_calls(whole))
                    done = whole or scan.finish()
                    reason = "tool_calls" if done else out.finish_reason
                    end = {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
                    return events + sse({**head, "choices": [end | {"stop_reason": out.stop_reason}]})
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
        return sse({**head, "choices": [choice]})

    error: ApiError | None = None
    # The role events lead the first delta in one piece: one write, so a client (or a gateway) takes
    # both, and the first token, in one wake-up.
    lead = ""
    if chat:
        for i in range(k):
            role = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            lead += sse({**head, "choices": [role]})
    i, out = first
    while True:
        text = chunk(i, out)
        if lead or text is not None:
            yield lead + (text or "")
            lead = ""
        if out.finished and error is None:
            error = finish_error(gen, out)
        try:
            i, out = await events.__anext__()
        except StopAsyncIteration:
            break
    if error is not None:
        yield sse_error(error)
    elif req.include_usage:
        yield sse({**head, "choices": [], "usage": _usage(finals, req.n)})  # type: ignore[arg-type]
    yield DONE
