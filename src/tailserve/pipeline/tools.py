"""The tool-calling loop: the model's parallel `tool_calls` run concurrently, each under its own
timeout (and never past the time left), and every failure — an unknown tool, bad arguments, an
exception, a timeout — goes back to the model as a `tool` message rather than ending the request.
The loop is bounded in rounds and in budget.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tailserve.pipeline.llm import ChatResult, LLMClient

ToolFn = Callable[[dict[str, Any], float], Awaitable[Any]]  # (arguments, seconds it may take) → result


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    run: ToolFn
    timeout_s: float  # the per-tool cap; the call gets min(this, time left)

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolOutcome:
    call_id: str
    name: str
    status: str  # ok | error | timeout
    elapsed_s: float
    content: str  # what the model is shown

    def message(self) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": self.call_id, "name": self.name, "content": self.content}


async def _one(call: Mapping[str, Any], tools: Mapping[str, ToolSpec], time_left: float) -> ToolOutcome:
    t0 = time.perf_counter()
    call_id = str(call.get("id", ""))
    fn = call.get("function") or {}
    name = str(fn.get("name", ""))

    def done(status: str, content: str) -> ToolOutcome:
        return ToolOutcome(call_id, name, status, time.perf_counter() - t0, content)

    spec = tools.get(name)
    if spec is None:
        return done("error", f"error: there is no tool named {name!r}")
    raw = fn.get("arguments") or "{}"
    try:
        args = json.loads(raw) if isinstance(raw, str) else dict(raw)
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
    except (ValueError, TypeError) as e:
        return done("error", f"error: the arguments are not a JSON object ({e})")
    limit = min(spec.timeout_s, time_left)
    if limit <= 0:
        return done("timeout", "error: no time left to call this tool")
    try:
        async with asyncio.timeout(limit):
            result = await spec.run(args, limit)
    except TimeoutError:
        return done("timeout", f"error: {name} did not answer within {limit:.2f} s")
    except Exception as e:  # any tool failure is reported to the model, not raised
        return done("error", f"error: {name} failed: {type(e).__name__}: {e}"[:500])
    return done("ok", result if isinstance(result, str) else json.dumps(result))


async def execute(
    calls: Sequence[Mapping[str, Any]],
    tools: Mapping[str, ToolSpec],
    time_left: Callable[[], float],
    parallel: bool = True,
) -> list[ToolOutcome]:
    """Run the calls (concurrently, or one after another when `parallel` is off), in call order."""
    if parallel:
        left = time_left()
        return list(await asyncio.gather(*(_one(c, tools, left) for c in calls)))
    return [await _one(c, tools, time_left()) for c in calls]


@dataclass
class LoopResult:
    messages: list[dict[str, Any]]  # the conversation with every call and result appended
    answer: ChatResult | None  # the model's last reply when it answered without calls, else None
    rounds: int = 0
    outcomes: list[ToolOutcome] = field(default_factory=list)


async def run_loop(
    llm: LLMClient,
    messages: list[dict[str, Any]],
    tools: Sequence[ToolSpec],
    time_left: Callable[[], float],
    max_rounds: int,
    parallel: bool = True,
    first_choice: str = "auto",
    **params: Any,
) -> LoopResult:
    """Ask the model, run its calls, feed the results back; at most `max_rounds` rounds of calls.
    Returns when the model answers without calls, the rounds are spent, or the time is: then the
    caller asks for the final answer (so it can stream it) with the results in `messages`."""
    by_name = {t.name: t for t in tools}
    out = LoopResult(list(messages), None)
    schemas = [t.schema() for t in tools]
    while out.rounds < max_rounds:
        choice = first_choice if out.rounds == 0 else "auto"
        reply = await llm.chat(out.messages, time_left(), tools=schemas, tool_choice=choice, **params)
        if not reply.tool_calls:
            out.answer = reply
            return out
        out.messages.append(reply.message())
        results = await execute(reply.tool_calls, by_name, time_left, parallel)
        out.outcomes.extend(results)
        out.messages.extend(r.message() for r in results)
        out.rounds += 1
    return out
