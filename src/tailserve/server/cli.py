"""`tailserve serve`: listen at once, load and warm the model on a thread (server/loading.py answers
meanwhile), then serve the OpenAI API with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tailserve.cluster.config import ClusterConfig
from tailserve.config import EngineConfig, ServerConfig, add_dataclass_args, dataclass_from_args, model_name

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from tailserve.engine.async_engine import AsyncEngine
    from tailserve.server.loading import LoadingApp

log = logging.getLogger("tailserve.server")


def _serve(args: argparse.Namespace) -> int:
    from tailserve.obs.startup import StartupTimer

    timer = StartupTimer()
    import uvicorn  # noqa: F401  (run_server's: timed with the other imports)

    from tailserve.server.loading import LoadingApp

    timer.lap("imports", next_phase="engine_imports")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = dataclass_from_args(EngineConfig, args)
    server_config = dataclass_from_args(ServerConfig, args)
    if server_config.api_key is None:  # a key in the environment stays out of `ps`
        server_config.api_key = os.environ.get("TAILSERVE_API_KEY") or None
    cluster = dataclass_from_args(ClusterConfig, args)
    if cluster.enabled:  # replicas on Ray Serve (the `ray` extra), each this same server
        from tailserve.cluster.cli import serve_cluster

        name = server_config.served_model_name or model_name(engine_config.model)
        return serve_cluster(cluster, engine_config, server_config, name)
    provider = None
    if server_config.otel_exporter:  # before the model loads, so a bad value fails at once
        from tailserve.obs.tracing import make_tracer_provider

        try:
            provider = make_tracer_provider(server_config.otel_exporter)
        except ValueError as e:
            log.error("%s", e)
            return 2
    name = server_config.served_model_name or model_name(engine_config.model)
    front = LoadingApp(timer, name)

    def load() -> tuple[AsyncEngine, Any]:
        """On the loader thread, while the socket already answers /health."""
        timer.skip()
        from tailserve.obs.observer import log_requests_to_stderr
        from tailserve.server.loading import start_serving

        if server_config.request_log:
            log_requests_to_stderr()
        engine, app = start_serving(engine_config, server_config, name, timer, provider)
        log.info("%s", timer.summary())
        log.info("serving %s (context %d tokens)", name, engine.max_model_len)
        return engine, app

    return run_server(front, load, server_config, on_listening=timer.listening)


def serve(
    engine: AsyncEngine, server_config: ServerConfig, name: str, provider: TracerProvider | None = None
) -> int:
    """Serve an engine already built (tests): `run_server` with nothing left to load."""
    from tailserve.obs.startup import StartupTimer
    from tailserve.server.app import build_app
    from tailserve.server.loading import LoadingApp

    app = build_app(engine, server_config, name, tracer_provider=provider)
    return run_server(LoadingApp(StartupTimer(), name), lambda: (engine, app), server_config)


def run_server(
    front: LoadingApp,
    load: Callable[[], tuple[AsyncEngine, Any]],
    server_config: ServerConfig,
    on_listening: Callable[[], None] | None = None,
) -> int:
    """Listen with `front` answering, run `load` on a thread, then serve its app until a signal (0), a
    failed load (1), or the engine thread's death (supervise.ENGINE_DIED, for a supervisor)."""
    import uvicorn

    from tailserve.server.loading import load_in_background
    from tailserve.server.shutdown import DrainingServer
    from tailserve.server.supervise import exit_status

    loaded: dict[str, Any] = {}  # the engine and the app, once built

    def load_app() -> Any:
        loaded["engine"], loaded["app"] = load()
        return loaded["app"]

    config = uvicorn.Config(
        front,
        host=server_config.host,
        port=server_config.port,
        access_log=server_config.access_log,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    server = DrainingServer(
        config,
        lambda: loaded["app"] if front.app is not None else None,
        server_config.shutdown_grace,
        on_listening=on_listening,
    )

    def failed() -> None:
        server.should_exit = True

    load_in_background(front, load_app, failed)
    try:
        server.run()
    finally:
        if "engine" in loaded:
            loaded["engine"].shutdown()
        if "app" in loaded:
            loaded["app"].state.server.obs.close()
    if front.error is not None:
        return 1
    return exit_status(loaded["engine"]) if "engine" in loaded else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve`: every EngineConfig and ServerConfig field as a flag."""
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API (the default model if none named)"
    )
    add_dataclass_args(p, EngineConfig)
    add_dataclass_args(p, ServerConfig)
    add_dataclass_args(p, ClusterConfig)
    p.set_defaults(func=_serve)
    return p
