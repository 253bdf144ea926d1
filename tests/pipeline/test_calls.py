"""LLM and tool calls against a fake OpenAI server: the budget reaches the server as `timeout`, a
shed or overdue answer becomes DeadlineExceeded, tool errors become tool messages, parallel calls
overlap, the loop is bounded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tailserve.pipeline import (
    Budget,
    DeadlineExceeded,
    LLMClient,
    Pipeline,
    Stage,
    StageContext,
    ToolSpec,
    UseDefault,
)
from tailserve.pipeline.llm import ChatResult
from tailserve.pipeline.tools import execute, run_loop
from tests.pipeline.conftest import FakeLLM, Reply, call


def _tool(name: str, delay: float = 0.0, fail: bool = False, timeout_s: float = 1.0) -> ToolSpec:
    async def run(args: dict[str, Any], limit: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        if fail:
            raise ConnectionError("backend refused")
        return {"tool": name, "args": args, "limit": limit}

    return ToolSpec(name, f"the {name} tool", {"type": "object", "properties": {}}, run, timeout_s)


def test_the_budget_reaches_the_server_as_timeout(llm_server: FakeLLM) -> None:
    async def go() -> dict:
        llm = LLMClient(llm_server.url, "m")

        async def answer(ctx: StageContext) -> str:
            reply = await llm.chat([{"role": "user", "content": "hi"}], ctx.remaining(), max_tokens=8)
            return reply.content

        stages = [Stage("wait", lambda ctx: asyncio.sleep(0.5)), Stage("answer", answer, after=("wait",))]
        try:
            return (await Pipeline(stages).run(Budget(5.0)))[0]
        finally:
            await llm.aclose()

    results = asyncio.run(go())
    assert results["answer"] == "fine"
    sent = llm_server.requests[0]
    assert sent["max_tokens"] == 8
    assert 4.0 < sent["timeout"] <= 4.5  # what was left of 5 s after a 0.5 s stage


def test_shed_and_overdue_calls_raise_deadline_exceeded(llm_server: FakeLLM) -> None:
    async def go(f: FakeLLM) -> list[tuple[str, float]]:
        llm = LLMClient(f.url, "m")
        out = []
        for timeout in (5.0, 5.0, 0.2, 0.0):
            t0 = time.perf_counter()
            try:
                await llm.chat([{"role": "user", "content": "x"}], timeout)
                out.append(("ok", time.perf_counter() - t0))
            except DeadlineExceeded:
                out.append(("deadline", time.perf_counter() - t0))
        await llm.aclose()
        return out

    script = [
        Reply(status=429, code="deadline_unmeetable"),
        Reply(status=504, code="deadline_exceeded"),
        Reply(delay=2),
    ]
    f = llm_server.reset(script)
    out = asyncio.run(go(f))
    assert [o for o, _ in out] == ["deadline"] * 4
    assert out[2][1] < 0.2 + 0.1  # the slow answer was given up at its timeout
    assert len(f.requests) == 3  # no time left: never sent


def test_streaming_fills_the_result(llm_server: FakeLLM) -> None:
    llm_server.default = Reply(content="one two three")

    async def go() -> tuple[list[str], ChatResult]:
        llm = LLMClient(llm_server.url, "m")
        res = ChatResult()
        pieces = [p async for p in llm.stream([{"role": "user", "content": "x"}], 2.0, res)]
        await llm.aclose()
        return pieces, res

    pieces, res = asyncio.run(go())
    assert "".join(pieces).split() == ["one", "two", "three"]
    assert res.ttft_s is not None and res.completion_tokens == 2 and res.finish_reason == "stop"
    assert llm_server.requests[0]["stream"] is True and llm_server.requests[0]["timeout"] <= 2.0


def test_tool_errors_become_tool_messages() -> None:
    tools = {
        t.name: t for t in (_tool("ok"), _tool("broken", fail=True), _tool("slow", delay=5, timeout_s=0.1))
    }
    calls = [
        call("ok", 0, q="a"),
        call("broken", 1),
        call("slow", 2),
        call("missing", 3),
        {"id": "call_4", "type": "function", "function": {"name": "ok", "arguments": "{not json"}},
    ]
    t0 = time.perf_counter()
    out = asyncio.run(execute(calls, tools, lambda: 1.0))
    assert time.perf_counter() - t0 < 0.5
    assert [o.status for o in out] == ["ok", "error", "timeout", "error", "error"]
    msgs = [o.message() for o in out]
    assert all(m["role"] == "tool" for m in msgs)
    assert [m["tool_call_id"] for m in msgs] == [f"call_{i}" for i in range(5)]
    assert "ConnectionError" in msgs[1]["content"] and "did not answer" in msgs[2]["content"]
    assert "no tool named" in msgs[3]["content"] and "JSON object" in msgs[4]["content"]
    assert '"limit": 1.0' in msgs[0]["content"]  # the tool was given its per-call limit


def test_the_time_left_caps_every_tool_call() -> None:
    out = asyncio.run(execute([call("slow")], {"slow": _tool("slow", delay=5, timeout_s=10)}, lambda: 0.1))
    assert out[0].status == "timeout" and out[0].elapsed_s < 0.3


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_calls_overlap(parallel: bool) -> None:
    tools = {n: _tool(n, delay=0.1) for n in ("a", "b", "c")}
    t0 = time.perf_counter()
    out = asyncio.run(execute([call("a"), call("b"), call("c")], tools, lambda: 2.0, parallel=parallel))
    wall = time.perf_counter() - t0
    assert [o.status for o in out] == ["ok"] * 3
    assert wall < 0.2 if parallel else wall >= 0.3


def test_the_loop_feeds_results_back_and_is_bounded_in_rounds(llm_server: FakeLLM) -> None:
    tools = [_tool("profile"), _tool("policy", fail=True)]

    async def go() -> Any:
        llm = LLMClient(llm_server.url, "m")
        try:
            msgs = [{"role": "user", "content": "q"}]
            return await run_loop(llm, msgs, tools, lambda: 2.0, 3, first_choice="required")
        finally:
            await llm.aclose()

    f = llm_server.reset([Reply(tool_calls=[call("profile", 0), call("policy", 1)]), Reply(content="answer")])
    res = asyncio.run(go())
    assert res.answer is not None and res.answer.content == "answer" and res.rounds == 1
    second = f.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool"]
    assert "ConnectionError" in second[3]["content"]
    assert f.requests[0]["tool_choice"] == "required" and f.requests[1]["tool_choice"] == "auto"
    assert all(r["tools"][0]["function"]["name"] == "profile" for r in f.requests)

    f.reset(default=Reply(tool_calls=[call("profile")]))  # a model that never stops calling
    res = asyncio.run(go())
    assert res.answer is None and res.rounds == 3 and len(f.requests) == 3


def test_a_stage_answering_past_its_allowance_gets_its_default(llm_server: FakeLLM) -> None:
    llm_server.reset(default=Reply(delay=2))

    async def go() -> tuple[dict, Any]:
        llm = LLMClient(llm_server.url, "m")

        async def answer(ctx: StageContext) -> str:
            return (await llm.chat([{"role": "user", "content": "q"}], ctx.remaining())).content

        try:
            return await Pipeline([Stage("answer", answer, on_overrun=UseDefault("late"))]).run(Budget(0.3))
        finally:
            await llm.aclose()

    results, rec = asyncio.run(go())
    assert results["answer"] == "late" and rec.stages[0].overrun
    assert rec.e2e_s < 0.3 + 0.1
    llm_server.reset([Reply(status=429, code="deadline_unmeetable")])  # shed at once: also an overrun
    results, rec = asyncio.run(go())
    assert results["answer"] == "late" and rec.stages[0].overrun and rec.stages[0].error == "deadline"


def test_the_rate_reader_scrapes_the_servers_metrics(llm_server: FakeLLM) -> None:
    from tailserve.pipeline.rates import RateReader

    llm_server.metrics_text = (
        'tailserve:prompt_tokens_total{model="m"} 3000\n'
        'tailserve:prefix_cache_hits_total{model="m"} 1000\n'
        'tailserve:request_prefill_time_seconds_sum{model="m",prompt_len_bucket="<128"} 0.5\n'
    )

    async def go() -> float | None:
        llm = LLMClient(llm_server.url, "m")
        try:
            return (await RateReader(llm_server.url, llm.http).get()).prefill_tokens_per_s
        finally:
            await llm.aclose()

    assert asyncio.run(go()) == 4000.0
