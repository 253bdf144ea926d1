"""Live servers on 127.0.0.1 with the default model.

`server`: one per session, uvicorn on a thread of this process, so tests can read the engine's
block pool directly. `spawn_server`: `tailserve serve` in a subprocess, for the flags and signals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tailserve.config import EngineConfig, ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.server.app import build_app

MODEL = "smollm2-135m-instruct"
API_KEY = "test-key"
ENGINE_FLAGS = {"kv_cache_memory": 0.5, "max_num_seqs": 48}


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    engine: AsyncEngine | None = None
    app: FastAPI | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: str | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def in_flight(self) -> int:
        """Engine requests the server has admitted and not yet seen end."""
        assert self.app is not None
        return self.app.state.server.admission.in_flight

    def log(self) -> str:
        if self.log_path is None:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    engine = AsyncEngine.from_config(EngineConfig(model=MODEL, **ENGINE_FLAGS))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = ServerConfig(api_key=API_KEY, max_body_bytes=1 << 20)
    app = build_app(engine, config, MODEL)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, timeout=30)
        yield LiveServer(url, engine=engine, app=app)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spawn_server(*flags: str) -> Iterator[LiveServer]:
    """`tailserve serve` with the test engine settings plus `flags`; stopped (SIGKILL if need be) on exit."""
    port = _free_port()
    engine_flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()]
    cmd = [sys.executable, "-m", "tailserve.cli", "serve", "--port", str(port), *engine_flags, *flags]
    with tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    live = LiveServer(f"http://127.0.0.1:{port}", proc=proc, log_path=log.name)
    try:
        wait_ready(live.url, proc)
        yield live
    except Exception:
        print(live.log())
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.unlink(log.name)
