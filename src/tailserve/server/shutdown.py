"""Graceful shutdown: on the first SIGTERM/SIGINT, drain, then let uvicorn close.

Draining refuses new work with 503 while the socket stays open (clients see a clear error, not a
refused connection), gives in-flight requests `--shutdown-grace` seconds, then aborts the rest. A
second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from tailserve.server.supervise import watch_loaded

if TYPE_CHECKING:  # the server module needs torch: not imported before the socket is bound
    from starlette.applications import Starlette

log = logging.getLogger("tailserve.server")


async def drain(app: Starlette, grace: float, poll: float = 0.05) -> None:
    """Graceful shutdown: refuse new work (503), let in-flight requests finish for up to `grace` seconds,
    then abort the rest (their clients get finish_reason "abort" and an error), and wait for them to end."""
    from tailserve.server.state import SHUTDOWN_MESSAGE, OpenAIServer

    server: OpenAIServer = app.state.server
    server.admission.draining = True
    end = time.monotonic() + grace
    while server.admission.in_flight and time.monotonic() < end:
        await asyncio.sleep(poll)
    if server.admission.in_flight:
        log.warning(
            "aborting %d requests still running after the %g s grace period",
            server.admission.in_flight,
            grace,
        )
        for gen in set(server.live.values()):
            gen.abort(SHUTDOWN_MESSAGE)
        end = time.monotonic() + 5.0
        while server.live and time.monotonic() < end:
            await asyncio.sleep(poll)
    log.info("drained")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its own shutdown. `get_app` gives the app to drain (None while the
    model still loads: a signal then exits at once). `on_listening` runs once the socket is bound."""

    def __init__(
        self,
        config: uvicorn.Config,
        get_app: Callable[[], Starlette | None],
        grace: float,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.get_app = get_app
        self.grace = grace
        self.on_listening = on_listening
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future[None] | None = None
        self._watch: asyncio.Future[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch = asyncio.ensure_future(watch_loaded(self.get_app, self))
        await super().startup(sockets)
        if self.on_listening is not None and self.started:
            self.on_listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or self.get_app() is None:  # a second signal, or
            # not serving yet: leave now
            self.force_exit = self._drain is not None
            self.should_exit = True
            return
        log.info("signal %d: draining for up to %g s", sig, self.grace)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        app = self.get_app()
        assert app is not None  # handle_exit leaves at once while none is loaded

        async def run() -> None:
            await drain(app, self.grace)
            self.should_exit = True

        if self._drain is None:
            self._drain = asyncio.ensure_future(run())
