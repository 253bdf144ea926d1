"""Supervision: a server whose engine thread has died exits, non-zero, for its supervisor to restart it.

The engine thread ends only on a fault that leaves its state unknown (engine/async_engine.py). From
then on every stream has had its error and `/ready` answers 503; what is left is to stop accepting
connections and end the process with a status a supervisor (systemd, Kubernetes, the gateway's
spawner) reads as a crash, instead of lingering as a process that answers nothing but errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

    from tailserve.engine.async_engine import AsyncEngine

log = logging.getLogger("tailserve.server")

ENGINE_DIED = 70  # the exit status then (EX_SOFTWARE): a crash, not a clean stop
POLL_S = 0.25


async def watch_engine(engine: AsyncEngine, server: uvicorn.Server, poll: float = POLL_S) -> None:
    """Tell uvicorn to exit as soon as the engine thread is gone (a normal stop ends the engine after)."""
    while engine.alive:
        await asyncio.sleep(poll)
    if not server.should_exit:
        log.critical("the engine thread has died (%s): exiting for a supervisor to restart", engine.failure)
        server.should_exit = True


async def watch_loaded(get_app: Callable[[], Any], server: uvicorn.Server, poll: float = POLL_S) -> None:
    """`watch_engine` on the app's engine, once `get_app` has one (the model loads behind the socket)."""
    while (app := get_app()) is None:
        if server.should_exit:
            return
        await asyncio.sleep(poll)
    await watch_engine(app.state.server.engine, server, poll)


def exit_status(engine: AsyncEngine) -> int:
    """0 after a clean stop, ENGINE_DIED when the engine thread died."""
    return 0 if engine.failure is None else ENGINE_DIED
