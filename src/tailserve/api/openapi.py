"""The OpenAPI document of the server and the gateway (`GET /openapi.json`), built from the same pydantic
models that validate requests, so it cannot drift from what the routes accept.

The routes read raw requests (to answer every error in the OpenAI envelope, cheapest check first), so
no framework could infer bodies from them; this module states them. The server is a plain Starlette
app (`served_app`: importing FastAPI took ~0.25 s of a 3 s start), the gateway a FastAPI one. It is
what API fuzzing (`benchmarks/fuzz.py`, `tests/e2e/test_fuzz.py`) generates requests from: every
error a route can give is declared with the `ErrorResponse` schema, so a body in any other shape fails
the fuzz run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tailserve.api.errors import ErrorResponse
from tailserve.api.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

E = TypeVar("E", bound=Callable[[Request], Awaitable[Response]])

REF = "#/components/schemas/{model}"
ERROR_STATUSES = ("400", "401", "404", "408", "413", "429", "500", "503", "504")


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("ErrorResponse")}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _errors(statuses: Sequence[str]) -> dict[str, Any]:
    return {s: _error("an error in the OpenAI envelope") for s in statuses}


def _body_schema(model: type[BaseModel], models: Sequence[str], defs: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema with `model` limited to the models served (another one is a 404)."""
    schema = model.model_json_schema(ref_template=REF)
    defs.update(schema.pop("$defs", {}))
    if models:
        schema["properties"]["model"] = {"type": "string", "enum": list(models)}
    return schema


def _generation(name: str, schema_name: str, summary: str) -> dict[str, Any]:
    ok = {
        "description": "the answer, or with stream=true an event stream of chunks ending in data: [DONE]",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["id", "choices"]}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return {
        "post": {
            "operationId": name,
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}},
            "responses": {"200": ok, **_errors(ERROR_STATUSES)},
        }
    }


def _plain(name: str, media: str, statuses: Sequence[str], authed: bool = False) -> dict[str, Any]:
    schema = {"type": "string"} if media.startswith("text/") else {"type": "object"}
    ok = {"description": "ok", "content": {media: {"schema": schema}}}
    op: dict[str, Any] = {"operationId": name, "responses": {"200": ok, **_errors(statuses)}}
    if authed:
        op["security"] = [{"bearer": []}, {}]
    return {"get": op}


def openapi_schema(title: str, models: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the OpenAI routes, the probes and /metrics, serving `models`."""
    defs: dict[str, Any] = {}
    schemas = {
        "ChatCompletionRequest": _body_schema(ChatCompletionRequest, models, defs),
        "CompletionRequest": _body_schema(CompletionRequest, models, defs),
        "ErrorResponse": ErrorResponse.model_json_schema(ref_template=REF),
    }
    defs.update(schemas["ErrorResponse"].pop("$defs", {}))
    model_path = _plain("retrieveModel", "application/json", ("401", "404"), authed=True)
    model_path["get"]["parameters"] = [
        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": {
            "/v1/chat/completions": _generation("createChatCompletion", "ChatCompletionRequest", "chat"),
            "/v1/completions": _generation("createCompletion", "CompletionRequest", "completion"),
            "/v1/models": _plain("listModels", "application/json", ("401",), authed=True),
            "/v1/models/{model_id}": model_path,
            "/health": _plain("health", "application/json", ("503",)),
            "/ready": _plain("ready", "application/json", ("503",)),
            "/metrics": _plain("metrics", "text/plain", ()),
        },
        "components": {
            "schemas": {**defs, **schemas},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def served_app(title: str, models: Callable[[], Sequence[str]]) -> Starlette:
    """A Starlette app serving this module's document at /openapi.json (routes are added to it)."""

    async def document(request: Request) -> JSONResponse:
        return JSONResponse(openapi_schema(title, models()))

    app = Starlette()
    app.add_route("/openapi.json", document, ["GET"])
    return app


def route(app: Starlette, method: str, path: str) -> Callable[[E], E]:
    """The decorator Starlette lacks: `@route(app, "GET", "/health")` serves the endpoint at `path`."""

    def add(endpoint: E) -> E:
        app.add_route(path, endpoint, [method])
        return endpoint

    return add


def documented_app(title: str, models: Callable[[], Sequence[str]], **kwargs: Any) -> FastAPI:
    """A FastAPI app without the docs pages, serving this module's document at /openapi.json."""
    from fastapi import FastAPI

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url="/openapi.json", **kwargs)
    app.openapi = lambda: openapi_schema(title, models())  # type: ignore[method-assign]
    return app
