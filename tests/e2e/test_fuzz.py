"""API fuzzing (schemathesis) of the server's and the gateway's OpenAPI documents, bounded: no 5xx, no
hang, every error in the OpenAI shape. The long run is benchmarks/fuzz.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tailserve.config import ServerConfig
from tailserve.gateway.app import Gateway
from tailserve.gateway.app import build_app as build_gateway
from tailserve.gateway.config import parse_config
from tailserve.gateway.pools import make_pools, resolve_urls
from tailserve.gateway.spawn import Spawned
from tailserve.server.app import build_app
from tests.e2e.conftest import MODEL, LiveServer
from tests.e2e.fuzz_checks import problems
from tests.gateway.conftest import serve

pytestmark = pytest.mark.model

HANG_S = 30.0  # an answer slower than this is a hang (the fuzz server's deadline is 2 s)


@pytest.fixture(scope="module", params=["server", "gateway"])
def fuzz_url(request, server: LiveServer) -> Iterator[str]:
    """A server on the session's engine with a 2 s deadline per request, and a gateway in front of it."""
    engine = server.engine
    hooks = (list(engine.step_hooks), list(engine.overflow_hooks))
    app = build_app(engine, ServerConfig(request_timeout=2.0, request_log=False), MODEL)
    try:
        with serve(app) as url, contextlib.ExitStack() as stack:
            if request.param == "gateway":
                config = parse_config({"models": {MODEL: {"backends": [{"url": url, "kind": "tailserve"}]}}})
                gw = Gateway(config, make_pools(config, resolve_urls(config, Spawned())))
                url = stack.enter_context(serve(build_gateway(gw), lifespan="on"))
            yield url
    finally:
        engine.step_hooks[:], engine.overflow_hooks[:] = hooks
        app.state.server.obs.close()


@pytest.fixture
def api(fuzz_url: str):
    return schemathesis.openapi.from_url(fuzz_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz(case, fuzz_url: str) -> None:
    response = case.call(base_url=fuzz_url, timeout=HANG_S)
    assert not problems(response.status_code, response.headers.get("content-type", ""), response.content)
