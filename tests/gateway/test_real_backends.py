"""The official `openai` client through the gateway to two real tailserve backends."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI

from tailserve.config import EngineConfig, ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.gateway.app import Gateway
from tailserve.gateway.config import parse_config
from tailserve.gateway.pools import make_pools, resolve_urls
from tailserve.gateway.spawn import Spawned
from tailserve.server.app import build_app as build_server
from tests.e2e.conftest import ENGINE_FLAGS, MODEL
from tests.gateway.conftest import LiveGateway, serve, serve_gateway

pytestmark = pytest.mark.model


@contextlib.contextmanager
def tailserve_backend(engine: AsyncEngine) -> Iterator[tuple[str, FastAPI, AsyncEngine]]:
    app = build_server(engine, ServerConfig(), MODEL)
    with serve(app) as url:
        yield url, app, engine


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[LiveGateway, list[tuple[str, FastAPI, AsyncEngine]]]]:
    """Two tailserve servers (one engine between them, to load the model once) behind a gateway."""
    engine = AsyncEngine.from_config(EngineConfig(model=MODEL, **ENGINE_FLAGS))
    try:
        with tailserve_backend(engine) as a, tailserve_backend(engine) as b:
            # `kind` left to discovery: both say owned_by tailserve in their /v1/models.
            backends = [{"url": a[0], "model": MODEL}, {"url": b[0], "model": MODEL}]
            config = parse_config({"models": {"chat": {"backends": backends}}})
            urls = resolve_urls(config, Spawned())
            assert all(kind == "tailserve" for [(_, kind)] in urls.values())
            gw = Gateway(config, make_pools(config, urls))
            with serve_gateway(gw) as url:
                yield LiveGateway(url, gw), [a, b]
    finally:
        engine.shutdown()


def test_openai_client_through_the_gateway(two) -> None:
    gw, _ = two
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["chat"]
    out = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
    )
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage is not None
    comp = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert comp.choices[0].text
    assert gw.in_flight() == 0


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tailserve:num_requests_running")
    )


def test_client_disconnect_frees_the_backends_blocks(two) -> None:
    gw, backends = two
    body = {
        "model": "chat",
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                assert _running(backends[0][0]) == 1  # the engine both servers share
                assert gw.in_flight() == 1
                break  # closes the connection: the client is gone
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if backends[0][2].stats.num_running == 0 and backends[0][2].stats.kv_cache_usage == 0:
            break
        time.sleep(0.05)
    assert _running(backends[0][0]) == 0
    assert all(app.state.server.admission.in_flight == 0 for _, app, _ in backends)
    assert backends[0][2].stats.kv_cache_usage == 0  # every block back
    assert gw.in_flight() == 0


def test_deadline_reaches_the_backend_as_its_timeout(two) -> None:
    gw, _ = two
    body = {
        "model": "chat",
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "ignore_eos": True,
        "timeout": 1.0,
    }
    start = time.monotonic()
    r = httpx.post(gw.url + "/v1/completions", json=body, timeout=30)
    assert time.monotonic() - start < 1.5
    assert (
        r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    )  # the backend's own answer
