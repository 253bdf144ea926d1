"""Shared plumbing for the benchmark scripts: start a server (ours or a peer) on 127.0.0.1, wait until
it answers, run `tailserve bench` against it, and read back the summary.

Every server is stopped by its PID when the block ends; every bench run is bounded in requests and time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tailserve.layers import kernels

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # raw runs and logs (not committed)
RECORDED = ROOT / "benchmarks" / "recorded"  # the summaries BENCHMARKS.md quotes (committed)
PEERS = ROOT.parent / "shared" / "peers"


def tailserve_cmd(port: int | None, *flags: str) -> list[str]:
    """`tailserve serve` with these flags (and the port, unless None: serving_all adds it)."""
    port_flags = [] if port is None else ["--port", str(port)]
    return [sys.executable, "-m", "tailserve.cli", "serve", *port_flags, *flags]


@dataclass
class Proc:
    """A started server: its base URL and its process (for memory sampling)."""

    url: str
    proc: subprocess.Popen[bytes]

    def rss_mib(self) -> float:
        """Resident memory now (VmRSS), MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def process(
    cmd: list[str], port: int, log: Path, timeout: float = 600.0, ready_path: str = "/v1/models"
) -> Iterator[Proc]:
    """Run a server command until the block ends; yields it once `ready_path` answers 200, and stops its
    whole process group after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        yield Proc(url, proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def serving(
    cmd: list[str], port: int, log: Path, timeout: float = 600.0, ready_path: str = "/v1/models"
) -> Iterator[str]:
    """`process`, yielding only the base URL."""
    with process(cmd, port, log, timeout, ready_path) as server:
        yield server.url


@contextlib.contextmanager
def serving_all(servers: dict[str, list[str]], first_port: int, logs: Path) -> Iterator[dict[str, str]]:
    """Several servers at once (label → command without --port), on consecutive ports: benchmarks
    alternate between them, so the machine's drift hits every setting alike. An idle tailserve server
    sleeps (its thread team parks after 3 ms), so the others do not slow it."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, (label, cmd) in enumerate(servers.items()):
            port = first_port + i
            urls[label] = stack.enter_context(
                serving([*cmd, "--port", str(port)], port, logs / f"{label}.log")
            )
        yield urls


def bench(url: str, out: Path, *flags: str) -> dict:
    """One `tailserve bench` run (quiet, no plots unless asked); returns its run record (`runs[0]`)."""
    cmd = [sys.executable, "-m", "tailserve.cli", "bench", "--url", url, "--quiet", "--out", str(out), *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())["runs"][0]


def closed_loop(
    url: str,
    out: Path,
    workload: str,
    concurrency: int,
    requests: int,
    output_tokens: int,
    seed: int,
    *flags: str,
) -> dict:
    """`bench` of a seeded workload at a fixed concurrency, without plots."""
    return bench(
        url,
        out,
        "--workload", workload,
        "--concurrency", str(concurrency),
        "--requests", str(requests),
        "--output-tokens", str(output_tokens),
        "--seed", str(seed),
        "--no-plots",
        *flags,
    )  # fmt: skip


def pct(run: dict, metric: str, q: str) -> float:
    return run["summary"]["latency"][metric][q]


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")


def header(title: str, command: str) -> str:
    """The figures' provenance: the CPU tier is the one tailserve runs at here ($TAILSERVE_CPU_TIER caps
    it), not the machine's best."""
    return (
        f"### {title}\n\n`{command}` — commit {commit()}, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()}-core {platform.machine()} ({cpu_name()}), tailserve CPU tier "
        f"{kernels.choose_tier()}, no GPU\n"
    )


def quantile(xs: list[float], p: float) -> float:
    """The `p` quantile of `xs`, the nearest rank below (the benchmarks' one definition)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def added_interval(
    base: list[list[float]], other: list[list[float]], p: float, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """How much `other` adds to `base` at quantile `p`, pooled over rounds, with a 95 % interval.

    `base[r]` and `other[r]` are round r's samples of the two endpoints (same prompts, alternating
    order). The interval resamples whole rounds, the pair kept together, so it holds the machine's
    drift between rounds as well as the sampling noise within them: an estimate whose interval
    straddles a target neither meets nor misses it. Returns (estimate, low, high)."""
    rng = random.Random(seed)
    n = len(base)

    def diff(rounds: list[int]) -> float:
        a = [x for r in rounds for x in base[r]]
        b = [x for r in rounds for x in other[r]]
        return quantile(b, p) - quantile(a, p)

    boots = sorted(diff([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return diff(list(range(n))), boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order of the endpoints. Up to three, every permutation in turn: over 2 or 6 rounds
    each takes each place and follows each other one equally often. Beyond, rotations: each place
    equally often over len(names) rounds. (Reversing every other round balances two, not three: the
    middle one never runs first or last.)"""
    if len(names) <= 3:
        orders = list(itertools.permutations(names))
        return list(orders[r % len(orders)])
    k = r % len(names)
    return names[k:] + names[:k]
