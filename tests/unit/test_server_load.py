"""What a tailserve server publishes about its load: the snapshot, its header, and both on the wire."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from tailserve.engine.engine import EngineStats
from tailserve.routing.load import parse_header, parse_json
from tailserve.server.admission import Admission, Limits
from tailserve.server.load import HEADER, header_value, install_load, snapshot


def server(rate: float, queued_tokens: int, in_flight: int) -> SimpleNamespace:
    adm = Admission(Limits(max_num_seqs=2, max_num_batched_tokens=100, max_queue=8, max_queue_tokens=10_000))
    adm.queued_tokens, adm.in_flight = queued_tokens, in_flight
    stats = EngineStats(num_running=2, prefill_tokens_per_s=rate, last_step_time=0.02)
    return SimpleNamespace(admission=adm, engine=SimpleNamespace(stats=stats))


def test_snapshot_predicts_the_queue_wait_plus_a_step() -> None:
    snap = snapshot(server(rate=1000.0, queued_tokens=490, in_flight=3))  # type: ignore[arg-type]
    assert snap["waiting"] == 1 and snap["running"] == 2 and snap["queued_tokens"] == 490
    # 490 tokens at 1000 tok/s less the 2 decodes' share of a 100-token step (980 tok/s): 0.5 s, + 0.02
    assert snap["predicted_ttft_s"] == pytest.approx(0.52)
    assert snap["prefill_tokens_per_s"] == pytest.approx(980.0)  # the rate a new prompt gets
    assert parse_header(header_value(snap).decode()) == (1.0, pytest.approx(0.52), 2.0, 980.0)
    cold = snapshot(server(rate=0.0, queued_tokens=0, in_flight=0))  # type: ignore[arg-type]
    assert cold["predicted_ttft_s"] is None and cold["prefill_tokens_per_s"] is None
    assert header_value(cold) == b"running=2;waiting=0"


def test_every_response_carries_the_header_and_load_answers_json() -> None:
    app = FastAPI()
    install_load(app, server(rate=1000.0, queued_tokens=0, in_flight=0))  # type: ignore[arg-type]

    @app.get("/x")
    async def x() -> PlainTextResponse:
        return PlainTextResponse("x")

    with TestClient(app) as client:
        r = client.get("/x")
        assert parse_header(r.headers[HEADER.decode()]) == (0.0, pytest.approx(0.02), 2.0, 980.0)
        assert parse_json(client.get("/load").json()) == (0.0, pytest.approx(0.02), 2.0, 980.0)
        assert HEADER.decode() in client.get("/missing").headers
