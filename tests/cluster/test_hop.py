"""The ingress → replica hop without a cluster: a request played into an ASGI app in process, the
affinity key of a body, and the trace context the ingress passes on."""

from __future__ import annotations

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tailserve.cluster.asgi import Start, play, request_scope
from tailserve.cluster.ingress import Ingress, request_key


def scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict:
    raw = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "/x",
        "client": ["1.2.3.4", 5],
    }
    return request_scope(raw, headers or [(b"host", b"h"), (b"content-type", b"application/json")])


def app(closed: asyncio.Event) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"got": (await request.json())["n"]}, headers={"x-a": "1"})

    async def ticks(request: Request) -> StreamingResponse:
        async def gen():
            try:
                for i in range(10_000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/echo", echo, methods=["POST"]), Route("/ticks", ticks, methods=["POST"])]
    )


def test_request_scope_drops_the_client_connection_headers() -> None:
    s = scope("/echo")
    assert s["headers"] == [(b"content-type", b"application/json")] and s["root_path"] == ""


def test_play_answers_start_with_the_body_then_ends() -> None:
    async def main() -> list:
        return [item async for item in play(app(asyncio.Event()), scope("/echo"), b'{"n": 7}')]

    [start] = asyncio.run(main())
    assert isinstance(start, Start) and start.status == 200 and start.body == b'{"got":7}'
    assert (b"x-a", b"1") in start.headers


def test_closing_the_stream_disconnects_the_app() -> None:
    async def main() -> bool:
        closed = asyncio.Event()
        stream = play(app(closed), scope("/ticks"), b"{}")
        start = await stream.__anext__()
        assert isinstance(start, Start) and start.body.startswith(b"data: 0")
        await stream.__anext__()
        await stream.aclose()  # what the ingress's cancel does to the replica's generator
        await asyncio.wait_for(closed.wait(), 2)
        return closed.is_set()

    assert asyncio.run(main())


def test_request_key_follows_the_affinity_rules() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}'
    )
    other = (
        b'{"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "v"}]}'
    )
    assert request_key("POST", body, None) == request_key("POST", other, None) is not None
    assert request_key("POST", body, "alice") == "session:alice"
    assert request_key("POST", b"not json", None) is None and request_key("GET", body, None) is None


def test_the_ingress_passes_its_own_span_on() -> None:
    tracer = TracerProvider().get_tracer("t")
    client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    span = tracer.start_span("ingress")
    headers = Ingress._inject(span, [(b"traceparent", client.encode()), (b"x-b", b"2")])
    [parent] = [v.decode() for k, v in headers if k == b"traceparent"]
    ctx = span.get_span_context()
    assert parent.split("-")[1] == format(ctx.trace_id, "032x")
    assert parent.split("-")[2] == format(ctx.span_id, "016x") and (b"x-b", b"2") in headers
