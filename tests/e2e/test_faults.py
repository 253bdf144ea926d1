"""Faults over HTTP, on the real model: a request failing in the engine step fails alone, a slow reader
loses only its own stream (counted in /metrics), a disconnect storm leaks nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tailserve.bench.prom import parse
from tailserve.bench.storm import idle_gauges, storm
from tailserve.config import ServerConfig
from tailserve.server.app import build_app
from tests.e2e.conftest import API_KEY, MODEL, LiveServer
from tests.e2e.test_load import wait_idle
from tests.gateway.conftest import serve

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_a_request_failing_in_the_engine_step_fails_alone(server: LiveServer, monkeypatch) -> None:
    wait_idle(server)
    runner = server.engine.engine.runner
    run = runner.run

    def failing_run(scheduled):
        if any(s.seq.request_id.startswith("poison") for s in scheduled):
            raise RuntimeError("injected fault")
        return run(scheduled)

    monkeypatch.setattr(runner, "run", failing_run)
    url = server.base_url + "/completions"
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 24, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            calls = [c.post(url, json={**body, "seed": i, "temperature": 0.5}) for i in range(4)]
            calls.insert(2, c.post(url, json=body, headers={"X-Request-ID": "poison-1"}))
            return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    bad = answers.pop(2)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "engine_error" and "injected fault" in error["message"]
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 24
    wait_idle(server)


def _metric(url: str, name: str) -> float:
    samples = parse(httpx.get(url + "/metrics").text)
    return sum(v for (n, _), v in samples.items() if n == name)


def test_a_slow_reader_loses_its_stream_and_slows_nobody(server: LiveServer, monkeypatch) -> None:
    """A second server on the same engine, whose connections have small kernel send buffers (Linux lets
    a connection buffer up to 4 MiB otherwise: thousands of events before the server notices)."""
    wait_idle(server)
    monkeypatch.setattr(server.engine, "max_buffered", server.engine.max_buffered)  # restored after
    app = build_app(server.engine, ServerConfig(api_key=API_KEY, stream_buffer=8), MODEL)
    hooks = (list(server.engine.step_hooks), list(server.engine.overflow_hooks))
    try:
        with serve(app, send_buffer=4096) as url:
            _slow_reader(server, url)
    finally:
        server.engine.step_hooks[:], server.engine.overflow_hooks[:] = hooks
        app.state.server.obs.close()
    wait_idle(server)


def _slow_reader(server: LiveServer, url: str) -> None:
    engine = server.engine.engine
    # Large events (20 top logprobs each) and a 4 KiB receive buffer: the sockets fill after a few dozen.
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story.",
        "max_tokens": 1500,
        "ignore_eos": True,
        "logprobs": 20,
        "stream": True,
    }
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((host, int(port)))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"X-Request-ID: slow-reader\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    slow.sendall(head.encode() + data)
    try:
        t0 = time.monotonic()
        while not any(r.startswith("slow-reader") for r in engine.requests):
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        # Another client meanwhile gets its whole answer; the slow one is aborted long before its end.
        fast = httpx.post(
            url + "/v1/completions",
            json={**body, "stream": False, "max_tokens": 48, "logprobs": None},
            headers=AUTH,
            timeout=60,
        )
        assert fast.status_code == 200 and fast.json()["usage"]["completion_tokens"] == 48
        while any(r.startswith("slow-reader") for r in engine.requests):
            assert time.monotonic() - t0 < 60, "the slow reader's request was never aborted"
            time.sleep(0.05)
        slow.settimeout(30)
        received = b""
        while chunk := slow.recv(65536):
            received += chunk
    finally:
        slow.close()
    text = received.decode(errors="replace")
    assert text.startswith("HTTP/1.1 200")
    assert '"code":"slow_reader"' in text and "data: [DONE]" in text.split('"code":"slow_reader"')[1]
    assert text.count('"finish_reason":null') < 1500  # ended early
    assert _metric(url, "tailserve:slow_reader_aborts_total") == 1


def test_a_disconnect_storm_of_200_streams_leaks_nothing(server: LiveServer) -> None:
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Write about the sea.", "max_tokens": 16, "ignore_eos": True}
    result = asyncio.run(
        storm(server.url, "/v1/completions", body, 200, concurrency=64, seed=7, headers=AUTH, max_events=12)
    )
    assert not result.errors, result.errors[:5]
    dropped = sum(result.by_moment.values())
    assert dropped + result.finished_first + result.refused == 200
    assert min(result.by_moment.values()) >= 30  # every moment was tried
    wait_idle(server, timeout=20)
    assert idle_gauges(httpx.get(server.url + "/metrics").text) == {
        "num_requests_running": 0.0,
        "num_requests_waiting": 0.0,
        "kv_cache_usage_perc": 0.0,
    }
    after = httpx.post(
        server.base_url + "/completions", json={**body, "max_tokens": 4}, headers=AUTH, timeout=30
    )
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
