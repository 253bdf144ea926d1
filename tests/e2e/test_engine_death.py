"""The engine thread dying, on a tiny model: every client gets an error at once, /ready and /health
answer 503, and `serve` exits with supervise.ENGINE_DIED for its supervisor, within seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import torch

from tailserve.config import ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.server.app import build_app
from tailserve.server.supervise import ENGINE_DIED
from tests.e2e.conftest import _free_port, wait_ready
from tests.tiny import tiny_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True}


def test_a_dead_engine_fails_its_clients_and_the_probes() -> None:
    threads = torch.get_num_threads()  # the tiny model on one thread; the rest of the session keeps its own
    torch.set_num_threads(1)
    engine = tiny_engine()
    aengine = AsyncEngine(engine)
    schedule = engine.scheduler.schedule

    def breaking_schedule():
        if any(rid.startswith("kill") for rid in engine.requests):
            raise RuntimeError("scheduler state corrupt")
        return schedule()

    engine.scheduler.schedule = breaking_schedule
    app = build_app(aengine, ServerConfig(request_log=False), "tiny")

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as c:
            assert (await c.get("/ready")).status_code == 200
            killed = await c.post("/v1/completions", json=LONG, headers={"X-Request-ID": "kill"})
            assert killed.status_code == 500
            assert "scheduler state corrupt" in killed.json()["error"]["message"]
            for probe in ("/ready", "/health"):
                r = await c.get(probe)
                assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
            late = await c.post("/v1/completions", json=LONG)
            assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        aengine.shutdown()
        app.state.server.obs.close()
        torch.set_num_threads(threads)


def test_serve_exits_nonzero_when_its_engine_dies() -> None:
    port = _free_port()
    # The tiny model on PyTorch ops alone: what is tried is supervision, not kernels (no build to wait on).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT])}
    env["TAILSERVE_DISABLE_KERNELS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.dying_server", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)
        # A request in flight when the engine dies (1,000 steps of at least 10 ms: it cannot finish first).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            victim = pool.submit(
                httpx.post, url + "/v1/completions", json={**LONG, "max_tokens": 1000}, timeout=20
            )
            time.sleep(1.0)
            kill = {"X-Request-ID": "kill"}
            killed = httpx.post(url + "/v1/completions", json=LONG, headers=kill, timeout=20)
            assert killed.status_code == 500
            answer = victim.result(timeout=20)  # an error at once, not a hang
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "engine_error"
        t0 = time.monotonic()
        assert proc.wait(timeout=20) == ENGINE_DIED
        assert time.monotonic() - t0 < 20
        assert b"engine thread has died" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
