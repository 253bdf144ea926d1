"""`tailserve serve`: load the model, then serve the OpenAI API with uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from tailserve.config import EngineConfig, ServerConfig, add_dataclass_args, dataclass_from_args

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from tailserve.engine.async_engine import AsyncEngine

log = logging.getLogger("tailserve.server")


def _serve(args: argparse.Namespace) -> int:
    from tailserve.engine.async_engine import AsyncEngine
    from tailserve.models.loader import model_name
    from tailserve.obs.observer import log_requests_to_stderr

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = dataclass_from_args(EngineConfig, args)
    server_config = dataclass_from_args(ServerConfig, args)
    if server_config.api_key is None:  # a key in the environment stays out of `ps`
        server_config.api_key = os.environ.get("TAILSERVE_API_KEY") or None
    provider = None
    if server_config.otel_exporter:  # before the model loads, so a bad value fails at once
        from tailserve.obs.tracing import make_tracer_provider

        try:
            provider = make_tracer_provider(server_config.otel_exporter)
        except ValueError as e:
            log.error("%s", e)
            return 2
    if server_config.request_log:
        log_requests_to_stderr()
    engine = AsyncEngine.from_config(engine_config)
    name = server_config.served_model_name or model_name(engine_config.model)
    return serve(engine, server_config, name, provider)


def serve(
    engine: AsyncEngine, server_config: ServerConfig, name: str, provider: TracerProvider | None = None
) -> int:
    """Serve `engine` until a signal (0) or until its engine thread dies (supervise.ENGINE_DIED)."""
    import uvicorn

    from tailserve.server.app import build_app
    from tailserve.server.shutdown import DrainingServer
    from tailserve.server.supervise import exit_status

    app = build_app(engine, server_config, name, tracer_provider=provider)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        access_log=server_config.access_log,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    log.info("serving %s (context %d tokens)", name, engine.max_model_len)
    try:
        DrainingServer(config, app, server_config.shutdown_grace).run()
    finally:
        engine.shutdown()
        app.state.server.obs.close()
    return exit_status(engine)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve`: every EngineConfig and ServerConfig field as a flag."""
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible API (the default model if none named)"
    )
    add_dataclass_args(p, EngineConfig)
    add_dataclass_args(p, ServerConfig)
    p.set_defaults(func=_serve)
    return p
