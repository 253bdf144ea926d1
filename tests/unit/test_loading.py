"""The server while it loads (server/loading.py): what /health, /ready, the API and /metrics answer
before the app is handed over, after it, and when loading fails."""

from __future__ import annotations

import asyncio
import threading

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tailserve.api.errors import error_body
from tailserve.obs.startup import StartupTimer
from tailserve.server.loading import LoadingApp, load_in_background, not_ready_body


def get(app: LoadingApp, *paths: str) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get(p) for p in paths]

    return asyncio.run(run())


def loaded_app() -> Starlette:
    return Starlette(routes=[Route("/ready", lambda r: PlainTextResponse("real"))])


def test_while_loading_only_health_and_metrics_answer_200() -> None:
    timer = StartupTimer()
    timer.lap("imports", next_phase="weights")
    front = LoadingApp(timer, "m")
    health, ready, chat, metrics = get(front, "/health", "/ready", "/v1/chat/completions", "/metrics")
    assert health.status_code == 200 and health.json() == {"status": "ok", "ready": False, "phase": "weights"}
    for r in (ready, chat):
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        body = r.json()
        assert body["error"]["code"] == "not_ready" and "weights" in body["error"]["message"]
        assert body.keys() == error_body("x", "service_unavailable").keys()
        assert body["error"].keys() == error_body("x", "service_unavailable")["error"].keys()
    assert metrics.status_code == 200
    assert 'tailserve:startup_phase_seconds{model="m",phase="imports"}' in metrics.text


def test_the_loaded_app_answers_everything_after_serve() -> None:
    front = LoadingApp(StartupTimer(), "m")
    front.serve(loaded_app())
    (ready,) = get(front, "/ready")
    assert ready.status_code == 200 and ready.text == "real"


def test_a_failed_load_turns_health_to_503_and_stops_the_server() -> None:
    front = LoadingApp(StartupTimer(), "m")
    stopped = threading.Event()

    def load() -> Starlette:
        raise OSError("no such model")

    load_in_background(front, load, stopped.set).join(timeout=10)
    assert stopped.is_set() and front.app is None
    health, ready = get(front, "/health", "/ready")
    assert health.status_code == ready.status_code == 503
    assert ready.json() == not_ready_body("the model failed to load: OSError: no such model", "load_failed")


def test_ready_is_503_until_the_load_returns() -> None:
    front = LoadingApp(StartupTimer(), "m")
    release = threading.Event()

    def load() -> Starlette:
        release.wait(timeout=10)
        return loaded_app()

    thread = load_in_background(front, load, lambda: None)
    assert get(front, "/ready")[0].status_code == 503
    release.set()
    thread.join(timeout=10)
    assert get(front, "/ready")[0].status_code == 200


def test_start_serving_freezes_start_up_objects_once_everything_is_built(monkeypatch) -> None:
    """Start-up's objects are frozen out of the collector's full passes (a full pass over ~200k of
    them held every thread for 79 ms under load), after the last of them is built, before ready."""
    import types

    import tailserve.engine.async_engine
    import tailserve.engine.load
    import tailserve.server.app
    from tailserve.server import loading

    events: list[str] = []

    class Engine:
        def __init__(self, llm: object) -> None:
            events.append("engine")

        def wait_prepared(self) -> None:
            events.append("prepared")

    class Timer(StartupTimer):
        def ready(self) -> None:
            events.append("ready")
            super().ready()

    app = types.SimpleNamespace(state=types.SimpleNamespace(server=types.SimpleNamespace(
        obs=types.SimpleNamespace(metrics=None))))  # fmt: skip
    monkeypatch.setattr(tailserve.engine.load, "load_engine", lambda cfg, timer: events.append("load"))
    monkeypatch.setattr(loading, "warm_up", lambda llm: events.append("warm"))
    monkeypatch.setattr(tailserve.engine.async_engine, "AsyncEngine", Engine)
    monkeypatch.setattr(tailserve.server.app, "build_app", lambda *a, **k: events.append("app") or app)
    monkeypatch.setattr(loading, "gc", types.SimpleNamespace(freeze=lambda: events.append("freeze")))
    loading.start_serving(None, None, "m", Timer())  # type: ignore[arg-type]
    assert events == ["load", "warm", "engine", "app", "prepared", "freeze", "ready"]
