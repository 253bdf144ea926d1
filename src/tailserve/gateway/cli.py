"""`tailserve gateway --config gateway.yaml` or `tailserve gateway --backend URL [--backend URL ...]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("tailserve.gateway")
BACKEND_POLL = 0.5  # seconds between looks at a --backend that is still starting


def models_when_up(url: str, api_key: str | None, wait: float) -> list[dict]:
    """A backend's /v1/models once it answers. One still starting (refusing connections, or a 503
    while it loads its model: a gateway and its backends are often started together) is waited for up
    to `wait` seconds; any other failure is final at once."""
    import httpx

    from tailserve.gateway.upstream import list_models

    end = time.monotonic() + wait
    told = False
    while True:
        try:
            return list_models(url, api_key=api_key)
        except (httpx.ConnectError, httpx.HTTPStatusError) as e:
            if isinstance(e, httpx.HTTPStatusError) and e.response.status_code != 503:
                raise
            if time.monotonic() >= end:
                raise
            if not told:
                log.info("--backend %s is not up yet (%s); waiting up to %g s for it", url, e, wait)
                told = True
            time.sleep(BACKEND_POLL)


def config_from_backends(urls: list[str], api_key: str | None = None, wait: float = 0.0) -> dict[str, Any]:
    """A config serving every model the backends list in their /v1/models, each on the backends listing
    it; a backend still starting is waited for up to `wait` seconds."""
    from tailserve.gateway.config import ConfigError

    models: dict[str, dict[str, Any]] = {}
    for url in urls:
        try:
            cards = models_when_up(url, api_key, wait)
        except Exception as e:
            raise ConfigError(f"--backend {url}: cannot list its models: {e}") from None
        for card in cards:
            kind = "tailserve" if card.get("owned_by") == "tailserve" else "openai"
            models.setdefault(card["id"], {"backends": []})["backends"].append(
                {"url": url, "kind": kind, "api_key": api_key}
            )
    if not models:
        raise ConfigError("--backend: the backends list no models")
    return {"models": models}


def _gateway(args: argparse.Namespace) -> int:
    from tailserve.gateway.app import Gateway
    from tailserve.gateway.config import ConfigError, check_cpus, load_config, parse_config
    from tailserve.gateway.pools import make_pools, resolve_urls
    from tailserve.gateway.spawn import Spawned

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per upstream request costs the hot path
    if bool(args.config) == bool(args.backend):
        log.error("give either --config FILE or one or more --backend URL")
        return 2
    try:
        if args.config:
            config = load_config(args.config)
        else:
            config = parse_config(
                config_from_backends(
                    args.backend, os.environ.get("TAILSERVE_BACKEND_API_KEY"), args.backend_wait
                )
            )
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        config = config.model_copy(update=overrides)
        if args.cpus is not None:
            check_cpus(args.cpus, "--cpus")
            config = config.model_copy(update={"cpus": args.cpus})
        if config.api_key is None:
            config.api_key = os.environ.get("TAILSERVE_API_KEY") or None
    except ConfigError as e:
        log.error("%s", e)
        return 2
    provider = None
    if config.otel_exporter:
        from tailserve.obs.tracing import make_tracer_provider

        provider = make_tracer_provider(config.otel_exporter)
    spawned = Spawned()
    try:
        urls = resolve_urls(config, spawned)
        timeouts = [b.spawn.startup_timeout for m in config.models.values() for b in m.backends if b.spawn]
        if timeouts:
            spawned.wait_ready(max(timeouts))
        gateway = Gateway(config, make_pools(config, urls), provider)
        try:
            run(_serve(gateway, config.host, config.port))
        except OSError as e:
            log.error("cannot serve on %s:%d: %s", config.host, config.port, e)
            return 1
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        spawned.stop()
    return 0


def run(main: Coroutine[Any, Any, None]) -> None:
    """`main` on uvloop where it is installed (a lower cost per request), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(gateway: Any, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then drain (requests in flight get 5 s) and return."""
    from tailserve.gateway.app import run_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = ", ".join(gateway.pools)

    def started() -> None:
        # The process is the gateway's own: what start-up built lives as long as it does, so the
        # collector's full passes skip it (gc.freeze) and walk only what serving allocates.
        gc.freeze()
        log.info("gateway on %s:%d serving %s", host, port, models)

    await run_gateway(gateway, stop, host=host, port=port, grace=5.0, started=started)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gateway", help="one OpenAI endpoint in front of many backends")
    p.add_argument("--config", help="the gateway's YAML file (models, backends, fallbacks, spawn)")
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        help="an OpenAI-compatible URL (repeatable); serves its models",
    )
    p.add_argument(
        "--backend-wait",
        type=float,
        default=300.0,
        help="seconds to wait for a --backend that is still starting (refusing connections, or 503)",
    )
    p.add_argument("--host", default=None, help="overrides the config's host")
    p.add_argument("--port", type=int, default=None, help="overrides the config's port")
    p.add_argument(
        "--cpus",
        type=lambda v: [int(c) for c in v.split(",")],
        default=None,
        help="pin the gateway to these CPUs, e.g. 1 or 2,3 (overrides the config's cpus)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug: a line per backend choice (key, backend, reason, every backend's load)",
    )
    p.set_defaults(func=_gateway)
    return p
