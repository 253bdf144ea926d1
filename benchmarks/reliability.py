"""Plumbing shared by the reliability benchmarks (soak.py, storm.py, fuzz.py): a `tailserve serve`
process and a `tailserve gateway` in front of it, on loopback, with their PIDs (for resident memory),
and the idle checks every one of them ends with."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator

import httpx
from harness import RESULTS, Proc, process

from tailserve.bench.storm import idle_gauges

MODEL = "smollm2-135m-instruct"
SERVER_FLAGS = ["--kv-cache-memory", "0.5", "--max-num-seqs", "48", "--no-request-log"]


def free_port() -> int:
    """A port nobody listens on now: fixed ports collide with other benchmarks on a shared machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_and_gateway(*flags: str) -> Iterator[tuple[Proc, Proc]]:
    """`tailserve serve` and `tailserve gateway` (model "chat" → it), each on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "tailserve.cli", "serve", "--port", str(port), *SERVER_FLAGS, *flags]
    with process(cmd, port, RESULTS / f"reliability-server-{port}.log", ready_path="/ready") as server:
        config = RESULTS / f"reliability-gateway-{port}.yaml"
        backends = [{"url": server.url, "kind": "tailserve", "model": MODEL}]
        config.write_text(json.dumps({"models": {"chat": {"backends": backends}}}))
        gw_cmd = [sys.executable, "-m", "tailserve.cli", "gateway", "--config", str(config)]
        gw_port = free_port()
        gw_cmd += ["--port", str(gw_port)]
        gw_log = RESULTS / f"reliability-gateway-{port}.log"
        with process(gw_cmd, gw_port, gw_log, ready_path="/ready") as gateway:
            yield server, gateway


def settled(server: Proc, timeout: float = 30.0) -> dict[str, float]:
    """The server's idle gauges once they read zero (or what they read when `timeout` ran out)."""
    end = time.monotonic() + timeout
    while True:
        gauges = idle_gauges(httpx.get(server.url + "/metrics", timeout=10).text)
        if not any(gauges.values()) or time.monotonic() > end:
            return gauges
        time.sleep(0.2)


def served(url: str, model: str) -> bool:
    """Whether a small request is answered in full now."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
