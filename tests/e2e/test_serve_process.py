"""`tailserve serve` as a process: load shedding under a burst, a graceful drain on SIGTERM, and a start
from the caches that never loads PyTorch."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tailserve.layers import kernels
from tests.e2e.conftest import MODEL, spawn_server

pytestmark = pytest.mark.model


def test_burst_beyond_max_queue_gets_fast_429s() -> None:
    with spawn_server("--max-num-seqs", "2", "--max-queue", "2") as srv:
        url = srv.base_url + "/completions"
        body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 24, "ignore_eos": True}
        assert httpx.post(url, json={**body, "max_tokens": 2}, timeout=60).status_code == 200  # warm up

        async def one(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
            t0 = time.perf_counter()
            r = await client.post(url, json=body)
            return r, time.perf_counter() - t0

        async def burst() -> list[tuple[httpx.Response, float]]:
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(*(one(client) for _ in range(20)))

        results = asyncio.run(burst())
        ok = [r for r, _ in results if r.status_code == 200]
        shed = [(r, dt) for r, dt in results if r.status_code == 429]
        assert len(ok) == 4 and len(shed) == 16, [r.status_code for r, _ in results]
        for r in ok:
            assert r.json()["usage"]["completion_tokens"] == 24
        for r, dt in shed:
            assert dt < 0.1, f"a 429 took {dt * 1000:.0f} ms"
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"


def _stream(url: str, body: dict, events: list, started: threading.Event) -> None:
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()


def test_sigterm_drains_in_flight_streams_then_exits() -> None:
    with spawn_server("--shutdown-grace", "5") as srv:
        url = srv.base_url + "/completions"
        body = {"model": MODEL, "prompt": "Once upon a time", "ignore_eos": True}
        short, long_ = [], []
        threads = []
        for events, n in ((short, 20), (long_, 5000)):
            started = threading.Event()
            t = threading.Thread(target=_stream, args=(url, {**body, "max_tokens": n}, events, started))
            t.start()
            assert started.wait(60)
            threads.append(t)

        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(url, json={**body, "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert httpx.get(srv.url + "/ready").status_code == 503
        for t in threads:
            t.join(30)

        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        assert long_[-1] == "[DONE]" and "shutting down" in long_[-2]["error"]["message"]
        assert long_[-3]["choices"][0]["finish_reason"] == "abort"
        assert srv.proc.wait(timeout=30) == 0


def test_a_start_from_the_caches_serves_without_loading_torch() -> None:
    """`import torch` was ~1 s of a 1.6 s warm start (issue 23). The first start packs the weights (with
    PyTorch) into the cache; a start after it serves the fused step with libtorch never mapped."""
    if kernels.ops() is None:
        pytest.skip("no C++ kernels here: the server runs the PyTorch model")
    with spawn_server():
        pass  # fills the packed-weight cache, if no start had
    with spawn_server() as srv:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7}
        r = httpx.post(srv.base_url + "/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        libraries = {line.split()[-1] for line in Path(f"/proc/{srv.proc.pid}/maps").read_text().splitlines()}
        assert any("tailserve_kernels" in lib for lib in libraries)  # the fused step did run
        assert not [lib for lib in libraries if "libtorch" in lib], "the server loaded PyTorch"
