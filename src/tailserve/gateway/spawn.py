"""Local `tailserve serve` backends the gateway starts itself (`spawn:` entries), on free loopback
ports, and stops when it stops: one command brings up a multi-replica endpoint.

Each spawned backend runs on a CPU share of its own (`cpu_shares`), and its step's thread team is
as large as its share. Left to the default, every one of them would start a team on all the
machine's cores: two replicas on two cores measured 13 % fewer output tokens/s at c=16 and a 14 %
longer ITL p50 than the same two with one thread each (BENCHMARKS.md), since the teams' barriers spin
while a member waits preempted by the other replica's. A `--num-threads` among the entry's args is
the user's own choice, and that replica is not pinned.
"""

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
from collections.abc import Callable

import httpx

log = logging.getLogger("tailserve.gateway")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_shares(cpus: list[int], n: int) -> list[list[int]]:
    """`n` replicas' CPUs out of `cpus`: contiguous, disjoint slices as even as they divide, or, with
    more replicas than CPUs, one CPU each in turn."""
    if n <= len(cpus):
        size, extra = divmod(len(cpus), n)
        bounds = [i * size + min(i, extra) for i in range(n + 1)]
        return [cpus[bounds[i] : bounds[i + 1]] for i in range(n)]
    return [[cpus[i % len(cpus)]] for i in range(n)]


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    """What the child runs before exec: SIGTERM it when the gateway dies, even by SIGKILL (Linux only),
    so a gateway that cannot run its cleanup leaves no backend holding a model's memory; and hold it
    to `cpus`, whose count its engine then takes for its thread team."""

    def setup() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Spawned:
    """The processes started for `spawn:` entries."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, args: list[str], cpus: list[int] | None = None) -> str:
        """Start one `tailserve serve` with `args` on a free port, held to `cpus` if given; its URL (not
        yet ready)."""
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_child_setup(cpus))
        url = f"http://127.0.0.1:{port}"
        self.procs.append((url, proc))
        on = f" on CPUs {','.join(map(str, cpus))}" if cpus else ""
        log.info("spawned tailserve serve on %s (pid %d)%s", url, proc.pid, on)
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
