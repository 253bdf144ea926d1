"""`tailserve serve` from a cold process: /health at once, /ready 503 (Retry-After, the phase named)
until the engine has loaded and warmed, 200 after; the start's figures on /metrics."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL, _free_port


@pytest.mark.model
def test_ready_is_503_until_warmed_then_200() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tailserve.cli", "serve", "--port", str(port), "--kv-cache-memory=0.25"]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            not_ready: list[httpx.Response] = []
            health_while_loading = []
            end = time.monotonic() + 120
            with httpx.Client(timeout=2) as client:
                while time.monotonic() < end and proc.poll() is None:
                    with contextlib.suppress(httpx.TransportError):
                        ready = client.get(url + "/ready")
                        if ready.status_code == 200:
                            break
                        not_ready.append(ready)
                        health_while_loading.append(client.get(url + "/health").status_code)
                    time.sleep(0.02)
                assert proc.poll() is None, "the server exited"
                assert ready.status_code == 200
                # The summary is logged after the warm-up and before the app is handed over.
                log.seek(0)
                summary = re.search(r"startup: ready in ([\d.]+) s .*warmup=", log.read())
                assert summary is not None
                metrics = client.get(url + "/metrics").text
                done = client.post(
                    url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}
                )
            assert not_ready, "never saw the server loading: it listened only once ready"
            assert set(health_while_loading) == {200}
            for r in not_ready:
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "not_ready"
            total = re.search(r'^tailserve:startup_seconds\{model="[^"]+"\} ([\d.e+-]+)$', metrics, re.M)
            assert total is not None and abs(float(total[1]) - float(summary[1])) < 0.01
            assert 'phase="warmup"' in metrics and 'phase="weights"' in metrics
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
        finally:
            proc.kill()
            proc.wait(timeout=30)
