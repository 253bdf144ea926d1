"""The OpenAI error envelope: `ApiError` raised anywhere on the request path, answered as
`{"error": {"message", "type", "param", "code"}}` with its HTTP status and headers.

Server and gateway answer every error through `error_response`, and install the same handlers for
routes that do not exist and for unexpected exceptions, so a client sees one shape whatever failed.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("tailserve.api")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as a 400 whose `param` is the field's dotted path."""
    first = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first['msg']}", param=param, code="invalid_value")


def error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    """The error as a response, with its own headers (Retry-After) and the request's id."""
    headers = dict(err.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app: Starlette, logger: logging.Logger = log) -> None:
    """Unknown routes and methods, and any unexpected exception, answered in the OpenAI envelope."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        )

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
