"""A fake OpenAI-compatible LLM server on 127.0.0.1 in this process: it records every request body
and answers each by the next scripted `Reply` (then by `default`), after the reply's delay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.gateway.conftest import serve


@dataclass
class Reply:
    content: str = "fine"
    tool_calls: list[dict[str, Any]] | None = None
    delay: float = 0.0
    status: int = 200
    code: str | None = None


def call(name: str, i: int = 0, **arguments: Any) -> dict[str, Any]:
    """A tool call as the server returns it."""
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


@dataclass
class FakeLLM:
    script: list[Reply] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    metrics_text: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def complete(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            r = self.script.pop(0) if self.script else self.default
            if r.delay:
                await asyncio.sleep(r.delay)
            if r.status != 200:
                err = {"error": {"message": "fake", "type": "x", "param": None, "code": r.code}}
                return JSONResponse(err, status_code=r.status)
            usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
            if body.get("stream"):
                return StreamingResponse(self._stream(r, usage), media_type="text/event-stream")
            msg: dict[str, Any] = {"role": "assistant", "content": None if r.tool_calls else r.content}
            if r.tool_calls:
                msg["tool_calls"] = r.tool_calls
            choice = {"index": 0, "message": msg, "finish_reason": "tool_calls" if r.tool_calls else "stop"}
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})

        async def metrics(request: Request) -> Response:
            return PlainTextResponse(self.metrics_text)

        return Starlette(
            routes=[Route("/v1/chat/completions", complete, methods=["POST"]), Route("/metrics", metrics)]
        )

    @staticmethod
    async def _stream(r: Reply, usage: dict[str, int]) -> AsyncIterator[str]:
        for word in r.content.split(" "):
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word + ' '}}]})}\n\n"
        yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def reset(self, script: list[Reply] | None = None, default: Reply | None = None) -> FakeLLM:
        self.script = list(script or [])
        self.default = default or Reply()
        self.requests.clear()
        self.metrics_text = ""
        return self


@pytest.fixture(scope="session")
def _shared_llm() -> Iterator[FakeLLM]:
    """One server for the whole run: starting and stopping one costs more than most tests here."""
    f = FakeLLM()
    with serve(f.app()) as url:
        f.url = url
        yield f


@pytest.fixture
def llm_server(_shared_llm: FakeLLM) -> FakeLLM:
    return _shared_llm.reset()
