"""API fuzzing (schemathesis) of the server's and the gateway's OpenAPI documents, bounded: no 5xx, no
hang, every error in the OpenAI shape. The long run is benchmarks/fuzz.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tailserve.config import ServerConfig
from tailserve.gateway.app import Gateway
from tailserve.gateway.config import parse_config
from tailserve.gateway.pools import make_pools, resolve_urls
from tailserve.gateway.spawn import Spawned
from tailserve.server.app import build_app
from tests.e2e.conftest import MODEL, LiveServer
from tests.e2e.fuzz_checks import fuzz
from tests.gateway.conftest import serve, serve_gateway

pytestmark = pytest.mark.model

EXAMPLES = 12  # generated cases per operation (7 operations)


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
                url = stack.enter_context(serve_gateway(gw))
            yield url
    finally:
        engine.step_hooks[:], engine.overflow_hooks[:] = hooks
        app.state.server.obs.close()


def test_fuzz(fuzz_url: str) -> None:
    statuses, failures = fuzz(fuzz_url, EXAMPLES)
    assert sum(statuses.values()) >= 7 * 5 and not failures, failures[:5]
