"""The completion routes straight from uvicorn, around FastAPI's stack; everything else through it.

The gateway's two POST routes are its whole hot path, and `_handle` already answers every error it
expects in the OpenAI envelope. FastAPI's layers around them (error, telemetry, body-limit and
exception middleware, the exit stack, route matching, dependency solving, and a wrapper around every
chunk sent) cost about a quarter of the gateway's own CPU per streamed request behind a zero-work
backend (cProfile on a CPU clock), and buy these routes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tailserve.api.errors import ApiError, error_response

log = logging.getLogger("tailserve.gateway")

Handler = Callable[[Request], Awaitable[Response]]


class FastPath:
    """ASGI: a POST to one of `routes` goes to its handler (another method: 405); any other scope
    (lifespan included) to `app`. An exception a handler did not expect is answered as the app would:
    a 500 in the envelope."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            err = ApiError(405, "Method Not Allowed", headers={"Allow": "POST"})
            await error_response(err)(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, tracked)
        except Exception as e:
            log.exception("unhandled error")
            if started:
                raise
            err = ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")
            await error_response(err)(scope, receive, send)
