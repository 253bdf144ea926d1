"""Tool calls through the server's response builders (server/responses.py), engine deltas stubbed: a
streamed call arrives as OpenAI sends it and reassembles to exactly the non-streamed answer."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from tailserve.api.protocol import ChatCompletionRequest
from tailserve.engine.outputs import RequestOutput
from tailserve.server import responses

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
    '{"name": "get_time", "arguments": {}}]}'
)


def outputs(parts: list[str]) -> list[tuple[int, RequestOutput]]:
    last = len(parts) - 1
    return [
        (
            0,
            RequestOutput(
                request_id="r",
                new_token_ids=[1],
                new_text=p,
                finished=i == last,
                finish_reason="stop" if i == last else None,
                stop_reason=None,
                error=None,
                num_prompt_tokens=5,
                num_cached_tokens=0,
                num_output_tokens=i + 1,
                logprobs=[],
                times=None,
            ),
        )
        for i, p in enumerate(parts)
    ]


def answer(parts: list[str], stream: bool) -> list[str] | dict:
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "?"}], tools=[WEATHER, TIME])
    outs = outputs(parts)

    async def rest():
        for o in outs[1:]:
            yield o

    gen = SimpleNamespace(engine_ids=["r"], timed_out=lambda o: False, abort_reason=None)
    server = SimpleNamespace(model_name="m")

    async def run():
        if not stream:
            return await responses.collect(server, req, gen, rest(), outs[0], "id", 0)
        return [s async for s in responses.stream(server, req, gen, rest(), outs[0], "id", 0)]

    return asyncio.run(run())


def events(sse: list[str]) -> list[dict]:
    return [
        json.loads(line[6:]) for chunk in sse for line in chunk.splitlines() if line.startswith("data: {")
    ]


@pytest.mark.parametrize("size", [1, 5, 200])
def test_streamed_calls_reassemble_to_the_answer(size: int) -> None:
    parts = [CALLS[i : i + size] for i in range(0, len(CALLS), size)]
    body = answer(parts, stream=False)
    want = [
        (c["id"] is not None, c["function"]["name"], c["function"]["arguments"])
        for c in body["choices"][0]["message"]["tool_calls"]
    ]
    got: dict[int, list] = {}
    openings = 0
    finish = None
    for e in events(answer(parts, stream=True)):
        choice = e["choices"][0]
        finish = choice["finish_reason"] or finish
        for d in choice["delta"].get("tool_calls", []):
            if "id" in d:
                openings += 1
                assert d["function"]["arguments"] == ""  # index, id and name come first
                got[d["index"]] = [True, d["function"]["name"], ""]
            else:
                got[d["index"]][2] += d["function"]["arguments"]
    assert [tuple(v) for _, v in sorted(got.items())] == want
    assert openings == 2 and finish == body["choices"][0]["finish_reason"] == "tool_calls"


def test_text_streams_as_content() -> None:
    sse = answer(["It is ", "sunny."], stream=True)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events(sse) if e["choices"])
    assert (
        content
        == "It is sunny."
        == answer(["It is ", "sunny."], stream=False)["choices"][0]["message"]["content"]
    )
