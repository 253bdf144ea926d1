"""Local `tailserve serve` backends the gateway starts itself (`spawn:` entries), on free loopback
ports, and stops when it stops: one command brings up a multi-replica endpoint."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

log = logging.getLogger("tailserve.gateway")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the gateway dies, even by SIGKILL (Linux only), so a
    gateway that cannot run its cleanup leaves no backend holding a model's memory."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Spawned:
    """The processes started for `spawn:` entries."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, args: list[str]) -> str:
        """Start one `tailserve serve` with `args` on a free port; its URL (not yet ready)."""
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "tailserve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
        url = f"http://127.0.0.1:{port}"
        self.procs.append((url, proc))
        log.info("spawned tailserve serve on %s (pid %d)", url, proc.pid)
        return url

    def wait_ready(self, timeout: float) -> None:
        """Until every spawned server answers /ready; a RuntimeError naming the one that exited or lagged."""
        end = time.monotonic() + timeout
        for url, proc in self.procs:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"spawned backend {url} exited with {proc.returncode} before it was ready"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > end:
                    raise RuntimeError(f"spawned backend {url} not ready after {timeout:g} s")
                time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (they drain), then SIGKILL what is left after `grace` seconds."""
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
