"""An OpenAI-compatible chat client that always sends the time left as the request's `timeout`.

That is the whole point of the budget: the server (or gateway) is told how long the answer may take,
sheds at once (429 `deadline_unmeetable`) when it cannot make it, and aborts overdue work (504, or a
stream that ends with an error), instead of answering after the caller gave up. Both become
`DeadlineExceeded`, which the stage's overrun policy answers like any other overrun.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tailserve.pipeline.stage import DeadlineExceeded

_DEADLINE_CODES = ("deadline_unmeetable", "deadline_exceeded")


class LLMError(Exception):
    """The server answered with an error that is not about time."""


@dataclass
class ChatResult:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # from sending to the first content (streams only)
    elapsed_s: float = 0.0

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def _raise_for(status: int, text: str) -> None:
    try:
        err = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    code = err.get("code") if isinstance(err, dict) else None
    message = err.get("message", text[:200]) if isinstance(err, dict) else text[:200]
    if status == 504 or code in _DEADLINE_CODES:
        raise DeadlineExceeded(f"HTTP {status} {code}: {message}")
    raise LLMError(f"HTTP {status} {code}: {message}")


class LLMClient:
    """One model behind one base URL (a tailserve server or gateway). `model` names the tier."""

    def __init__(
        self, base_url: str, model: str, http: httpx.AsyncClient | None = None, api_key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        # Plain http needs no TLS context, and building one costs 0.3-1.5 s of CPU on a loaded machine.
        tls = self.base_url.startswith("https://")
        self.http = http or httpx.AsyncClient(trust_env=False, timeout=None, verify=tls)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def with_model(self, model: str) -> LLMClient:
        """The same server and connections, another model (the small tier)."""
        out = LLMClient(self.base_url, model, self.http)
        out.headers = self.headers
        return out

    async def aclose(self) -> None:
        await self.http.aclose()

    def _body(self, messages: list[dict[str, Any]], timeout_s: float, **params: Any) -> dict[str, Any]:
        if timeout_s <= 0:
            raise DeadlineExceeded("no time left for the call")
        body = {"model": self.model, "messages": messages, "timeout": round(timeout_s, 4)}
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    async def chat(
        self,
        messages: list[dict[str, Any]],
        timeout_s: float,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> ChatResult:
        """One non-streaming completion (tools, tool_choice, max_tokens… pass through as `params`)."""
        body = self._body(messages, timeout_s, **params)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.http.post(
                    self.base_url + "/v1/chat/completions",
                    json=body,
                    headers={**self.headers, **(headers or {})},
                )
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout_s:.3f} s") from None
        if resp.status_code != 200:
            _raise_for(resp.status_code, resp.text)
        data = resp.json()
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        usage = data.get("usage") or {}
        return ChatResult(
            content=msg.get("content") or "",
            tool_calls=list(msg.get("tool_calls") or []),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            elapsed_s=time.perf_counter() - t0,
        )

    async def stream(
        self,
        messages: list[dict[str, Any]],
        timeout_s: float,
        result: ChatResult,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> AsyncIterator[str]:
        """Content pieces as they arrive; `result` is filled in as the stream goes (usage at the end).
        The deadline covers the whole stream: past it the connection is closed."""
        body = self._body(messages, timeout_s, stream=True, stream_options={"include_usage": True}, **params)
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        pieces: list[str] = []
        try:
            async with (
                asyncio.timeout(timeout_s),
                self.http.stream(
                    "POST",
                    self.base_url + "/v1/chat/completions",
                    json=body,
                    headers={**self.headers, **(headers or {})},
                ) as resp,
            ):
                if resp.status_code != 200:
                    _raise_for(resp.status_code, (await resp.aread()).decode(errors="replace"))
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    ev = json.loads(payload)
                    if ev.get("error"):
                        err = ev["error"]
                        _raise_for(504 if err.get("code") in _DEADLINE_CODES else 500, json.dumps(ev))
                    for ch in ev.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content")
                        if ch.get("finish_reason"):
                            result.finish_reason = ch["finish_reason"]
                        if piece:
                            if result.ttft_s is None:
                                result.ttft_s = time.perf_counter() - t0
                            pieces.append(piece)
                            yield piece
                    usage = ev.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens", 0)
                        result.completion_tokens = usage.get("completion_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens", 0)
        except TimeoutError:
            raise DeadlineExceeded(f"the stream ran past its {deadline - t0:.3f} s") from None
        finally:
            result.content = "".join(pieces)
            result.elapsed_s = time.perf_counter() - t0
