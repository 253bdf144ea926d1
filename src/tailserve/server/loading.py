"""Readiness that tells the truth: listen at once, load and warm the model behind, then serve.

`tailserve serve` binds its port before the model loads. Until the engine is loaded and warmed,
`LoadingApp` answers `/health` 200 (the process is alive), `/ready` and every API route 503 with
Retry-After and an OpenAI-style error body naming the phase, and `/metrics` with the start's gauges
(obs/startup.py), so an orchestrator sees a replica coming rather than a refused connection. Once
`serve(app)` is called every request goes to the real app. The loader runs on its own thread; it
warms the step's shapes (`warm_up`) before the app is handed over, so the first request's TTFT is
the steady state's, not the cost of first-touching the weights and starting the thread team.

This module imports neither torch nor FastAPI: it is on the path to the first bound socket.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from tailserve.obs.startup import StartupTimer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from tailserve.config import EngineConfig, ServerConfig
    from tailserve.engine.async_engine import AsyncEngine
    from tailserve.engine.engine import LLMEngine

log = logging.getLogger("tailserve.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_S = 1  # loading takes seconds: ask again soon


def not_ready_body(message: str, code: str = "not_ready") -> dict[str, Any]:
    """The OpenAI error envelope (api/errors.py's shape, built without pydantic)."""
    return {"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}


class LoadingApp:
    """The ASGI app uvicorn serves from the start: answers for the server while it loads, then hands
    every request to the app given to `serve`."""

    def __init__(self, timer: StartupTimer, model: str) -> None:
        self.timer = timer
        self.model = model
        self.app: ASGIApp | None = None
        self.error: str | None = None  # why loading failed; /health turns 503

    def serve(self, app: ASGIApp) -> None:
        """From now on `app` answers everything (one reference swap: atomic for the event loop)."""
        self.app = app

    def fail(self, error: str) -> None:
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets; lifespan is off
            return
        path = scope["path"]
        if path == "/health" and self.error is None:
            await _send_json(send, 200, {"status": "ok", "ready": False, "phase": self.timer.phase})
        elif path == "/metrics":
            await _send_metrics(send, self.timer, self.model)
        elif self.error is not None:
            body = not_ready_body(f"the model failed to load: {self.error}", code="load_failed")
            await _send_json(send, 503, body)
        else:
            message = (
                f"the model is loading ({self.timer.phase}, {self.timer.elapsed:.1f} s since start); "
                f"retry after {RETRY_AFTER_S} s"
            )
            await _send_json(send, 503, not_ready_body(message), {"retry-after": str(RETRY_AFTER_S)})


async def _send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _send_metrics(send: Send, timer: StartupTimer, model: str) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(timer.collector(model))
    data = generate_latest(registry)
    headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def load_in_background(
    front: LoadingApp, load: Callable[[], ASGIApp], on_error: Callable[[], None]
) -> threading.Thread:
    """Run `load` on a thread; hand its app to `front`, or record the failure and call `on_error`."""

    def run() -> None:
        try:
            app = load()
        except BaseException as e:  # anything, even SystemExit from a dependency: the server must know
            log.exception("loading the model failed")
            front.fail(f"{type(e).__name__}: {e}")
            on_error()
            return
        front.serve(app)

    thread = threading.Thread(target=run, name="tailserve-load", daemon=True)
    thread.start()
    return thread


def warm_up(engine: LLMEngine, prompt_tokens: int = 48, new_tokens: int = 8) -> None:
    """One request through the step before ready: a prefill chunk, then decodes. It first-touches
    the memory-mapped weights, starts the step's thread team and sizes its buffers, and runs the
    sampler and detokenizer once, so none of that lands on the first client's TTFT. The step-time
    models are then reset: a cold step is not what admission should predict from."""
    from tailserve.engine.step_time import StepTimeModel
    from tailserve.sampling import SamplingParams

    tok = engine.tokenizer
    if tok is not None:  # the chat template and the tokenizer's first encode
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
    vocab = engine.num_sampleable
    ids = [(7 + 31 * i) % vocab for i in range(min(prompt_tokens, engine.max_model_len - new_tokens))]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("tailserve-warmup", ids, params)
    while engine.has_unfinished():
        engine.step()
    engine.step_times = StepTimeModel()
    engine.decode_step_times = StepTimeModel()


def start_serving(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    name: str,
    timer: StartupTimer,
    tracer_provider: TracerProvider | None = None,
) -> tuple[AsyncEngine, Any]:
    """The engine and its app, ready: loaded phase by phase, warmed (`warm_up`), the grammar
    vocabulary prepared, the start's phases exported on the app's metrics, and start-up's objects
    frozen out of the garbage collector's passes. `tailserve serve` runs it on its loader thread; a Ray
    replica in its constructor, since Ray routes to it once that returns. Both are processes of their
    own: not for a process that goes on to do other work (its start-up garbage would never be freed)."""
    from tailserve.engine.async_engine import AsyncEngine
    from tailserve.engine.load import load_engine
    from tailserve.server.app import build_app

    timer.lap("engine_imports", next_phase="model_config")
    llm = load_engine(engine_config, timer)
    timer.phase = "warmup"
    warm_up(llm)
    timer.lap("warmup", next_phase="app")
    engine = AsyncEngine(llm)
    app = build_app(engine, server_config, name, tracer_provider=tracer_provider)
    if app.state.server.obs.metrics is not None:
        app.state.server.obs.metrics.registry.register(timer.collector(name))
    timer.lap("app", next_phase="grammar")
    engine.wait_prepared()
    timer.lap("grammar")
    # Start-up's ~200k objects (torch, the model, the app) live as long as the process, which is the
    # server's or the replica's own: frozen, they are out of the collector's full passes, one of which
    # held every thread for 79 ms in a c=16 run (BENCHMARKS.md).
    gc.freeze()
    timer.ready()
    return engine, app
