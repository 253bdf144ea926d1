"""Where a server's start goes: phases timed from the process's own start, one log line, one gauge.

A replica's start → ready time decides how early scale-out has to act (a new replica only takes load
once ready), so it is measured in one place and exported: `StartupTimer.ready_seconds` for code that
starts engines itself (Ray Serve replicas), and `tailserve:startup_seconds` on `/metrics`. Phases are
the steps of the load, in the order they ran; the clock starts at the process's start (Linux reports
it in /proc/self/stat), so the interpreter's own start and the first imports are counted too.

This module imports nothing heavy: it is imported before torch, to time torch's import.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("tailserve.startup")

METRIC_PREFIX = "tailserve:"


def process_age(stat: str | None = None, uptime: str | None = None) -> float | None:
    """Seconds since this process started, from /proc (10 ms resolution); None where /proc is absent.
    `stat`/`uptime` are the two files' texts (read here when not given)."""
    try:
        stat = stat if stat is not None else Path("/proc/self/stat").read_text()
        uptime = uptime if uptime is not None else Path("/proc/uptime").read_text()
        # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        return max(0.0, float(uptime.split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupTimer:
    """Phases of one start, as they end (`lap`), and the two moments that matter: listening (`/health`
    answers) and ready (`/ready` answers 200). Thread-safe: the listener and the loader run on two
    threads."""

    def __init__(self, started: float | None = None) -> None:
        """`started`: the perf_counter() value the clock starts at; default: the process's start."""
        now = time.perf_counter()
        age = process_age() if started is None else None
        self.started = started if started is not None else now - (age or 0.0)
        self.phases: dict[str, float] = {}
        self.listening_at: float | None = None
        self.ready_at: float | None = None
        self.phase = "starting"  # the phase running now (what /ready's 503 names)
        self._last = self.started
        self._lock = threading.Lock()
        if age is not None:
            self.lap("interpreter")

    def lap(self, name: str, *, next_phase: str | None = None) -> float:
        """End phase `name` now (it ran since the previous lap); `next_phase` names what runs next."""
        now = time.perf_counter()
        with self._lock:
            took = now - self._last
            self.phases[name] = self.phases.get(name, 0.0) + took
            self._last = now
            self.phase = next_phase or self.phase
        return took

    def skip(self) -> None:
        """Restart the phase clock without charging the time to any phase (time spent elsewhere)."""
        with self._lock:
            self._last = time.perf_counter()

    def listening(self) -> None:
        self.listening_at = time.perf_counter()

    def ready(self) -> None:
        with self._lock:
            self.ready_at = time.perf_counter()
            self.phase = "ready"

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def ready_seconds(self) -> float | None:
        """Process start → ready, or None while not ready."""
        return None if self.ready_at is None else self.ready_at - self.started

    @property
    def listening_seconds(self) -> float | None:
        return None if self.listening_at is None else self.listening_at - self.started

    def summary(self) -> str:
        """The one log line: the total, then every phase in the order it ran."""
        parts = " ".join(f"{name}={took:.2f}s" for name, took in self.phases.items())
        ready = self.ready_seconds
        head = f"ready in {ready:.2f} s" if ready is not None else f"not ready after {self.elapsed:.2f} s"
        listening = self.listening_seconds
        if listening is not None:
            head += f" (listening at {listening:.2f} s)"
        return f"startup: {head}: {parts}"

    def collector(self, model: str) -> Collector:
        return _StartupCollector(self, model)


class _StartupCollector(Collector):
    """`tailserve:startup_seconds` (start → ready), `tailserve:startup_listening_seconds` and
    `tailserve:startup_phase_seconds{phase}`, read from the timer at scrape time."""

    def __init__(self, timer: StartupTimer, model: str) -> None:
        self.timer = timer
        self.model = model

    def collect(self) -> Iterator[Metric]:
        t = self.timer
        for name, value, doc in (
            ("startup_seconds", t.ready_seconds, "Process start to ready (/ready answers 200)."),
            ("startup_listening_seconds", t.listening_seconds, "Process start to /health answering."),
        ):
            if value is not None:
                g = GaugeMetricFamily(METRIC_PREFIX + name, doc, labels=["model"])
                g.add_metric([self.model], value)
                yield g
        g = GaugeMetricFamily(
            METRIC_PREFIX + "startup_phase_seconds",
            "Seconds each phase of the start took, in the order they ran.",
            labels=["model", "phase"],
        )
        for name, took in list(t.phases.items()):
            g.add_metric([self.model, name], took)
        yield g
