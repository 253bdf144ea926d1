"""Concurrency and disconnects: many streams at once; a dropped client frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL, LiveServer

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def wait_idle(server: LiveServer, timeout: float = 10.0) -> None:
    """Until no request is in flight and every KV block is free again."""
    bm = server.engine.engine.block_manager
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (
            server.in_flight == 0
            and bm.num_free_blocks == bm.num_blocks
            and not server.engine.engine.requests
        ):
            return
        time.sleep(0.01)
    raise AssertionError(
        f"not idle: in_flight={server.in_flight} free={bm.num_free_blocks}/{bm.num_blocks} "
        f"requests={list(server.engine.engine.requests)}"
    )


def test_32_concurrent_streams(server: LiveServer) -> None:
    tok = server.engine.tokenizer

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        messages = [{"role": "user", "content": f"Write a sentence about the number {i}."}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            usage = c.usage or usage
        assert finish == "length" and text
        assert usage.completion_tokens == 12
        assert usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages)))

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        await asyncio.gather(*(one(client, i) for i in range(32)))
        await client.close()

    wait_idle(server)
    asyncio.run(main())
    wait_idle(server)


def test_disconnect_aborts_and_frees_blocks(server: LiveServer) -> None:
    engine = server.engine.engine
    wait_idle(server)
    url = server.base_url + "/completions"
    dropped_at: dict[str, float] = {}

    async def stream(i: int, drop: bool) -> int | None:
        rid = f"disconnect-{i}"
        body = {
            "model": MODEL,
            "prompt": f"Story {i}: once upon a time",
            "max_tokens": 40,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            httpx.AsyncClient(headers={**AUTH, "X-Request-ID": rid}, timeout=120) as client,
            client.stream("POST", url, json=body) as r,
        ):
            assert r.status_code == 200
            chunks, usage = 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                usage = data.get("usage") or usage
                chunks += bool(data["choices"])
                if drop and chunks == 3:
                    dropped_at[rid] = time.perf_counter()
                    return None  # leaving the block closes the connection mid-stream
            return usage["completion_tokens"]

    async def main() -> list[int | None]:
        return await asyncio.gather(*(stream(i, drop=i % 2 == 0) for i in range(8)))

    results = asyncio.run(main())
    assert results == [None, 40] * 4  # the kept streams finished in full

    # Each dropped request left the engine promptly (its abort is taken between two steps).
    for rid, t in dropped_at.items():
        while rid in engine.requests:
            assert time.perf_counter() - t < 2.0, f"{rid} still running 2 s after its client left"
            time.sleep(0.005)
    wait_idle(server)


def test_non_streaming_disconnect_aborts(server: LiveServer) -> None:
    engine = server.engine.engine
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base_url + "/completions",
            json=body,
            timeout=0.5,
            headers={**AUTH, "X-Request-ID": "gone-early"},
        )
    left = time.perf_counter()
    while "gone-early" in engine.requests:
        assert time.perf_counter() - left < 2.0
        time.sleep(0.005)
    wait_idle(server)


def test_deadline_aware_admission_sheds_at_once(server: LiveServer) -> None:
    wait_idle(server)
    url = server.base_url + "/completions"
    httpx.post(
        url, json={"model": MODEL, "prompt": "Warm up the rate.", "max_tokens": 1}, headers=AUTH, timeout=60
    )
    rate = server.engine.stats.prefill_tokens_per_s
    assert rate > 0
    long_prompt = "word " * 1500
    timeout = 0.25 * len(server.engine.tokenizer.encode(long_prompt)) / rate  # far less than its prefill

    async def main() -> None:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            long_req = asyncio.create_task(
                c.post(url, json={"model": MODEL, "prompt": long_prompt, "max_tokens": 1})
            )
            while server.in_flight == 0:
                await asyncio.sleep(0.001)
            t0 = time.perf_counter()
            shed = await c.post(
                url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "timeout": timeout}
            )
            dt = time.perf_counter() - t0
            assert shed.status_code == 429 and shed.json()["error"]["code"] == "deadline_unmeetable", (
                shed.text
            )
            assert int(shed.headers["retry-after"]) >= 1 and dt < 0.5
            patient = await c.post(
                url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "timeout": 120}
            )
            assert patient.status_code == 200
            assert (await long_req).status_code == 200

    asyncio.run(main())
    wait_idle(server)


def test_a_reused_request_id_gets_its_own_answer(server: LiveServer) -> None:
    """Concurrent requests may share an X-Request-ID, and a retry right after a dropped request with the
    same id must not receive that request's abort."""
    wait_idle(server)
    url = server.base_url + "/completions"
    headers = {**AUTH, "X-Request-ID": "retry-me"}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=headers, timeout=60) as c:
        with c.stream("POST", url, json=body) as r:
            lines = r.iter_lines()
            next(lines)
            again = c.post(url, json={**body, "max_tokens": 3, "stream": False})  # while the first runs
            assert again.status_code == 200 and again.json()["id"] == "retry-me"
            assert again.json()["choices"][0]["finish_reason"] == "length"
            lines.close()  # drop the first stream mid-way, then retry at once
        retry = c.post(url, json={**body, "max_tokens": 3, "stream": False})
        assert retry.json()["choices"][0]["finish_reason"] == "length", retry.text
        assert retry.json()["usage"]["completion_tokens"] == 3
    wait_idle(server)
