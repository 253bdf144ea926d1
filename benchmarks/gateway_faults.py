"""Faults: two tailserve backends behind `tailserve gateway`; one is SIGKILLed mid-run and restarted
later. Reported: client requests failed (split by whether they had started streaming: only those may
fail), when the killed backend's breaker opened and closed again (a timeline plot with each request's
TTFT), and TTFT p50/p99 before, during and after the outage.

    .venv/bin/python benchmarks/gateway_faults.py [--requests 240] [--concurrency 8] [--kill-at 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from harness import RECORDED, RESULTS, bench, header, quantile, serving, tailserve_cmd

MODEL = "smollm2-135m-instruct"
PORTS = (8140, 8141)
GATEWAY_PORT = 8142
STATE_NAMES = {0: "closed", 1: "half-open", 2: "open"}


def q(xs: list[float], p: float) -> float | None:
    return quantile(xs, p) if xs else None


class Sampler:
    """Polls the gateway's /metrics every 0.1 s: breaker state per backend, and the moment the first
    request is in flight (the origin of every time axis here, and of the bench's own `start_s`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, str, int]] = []  # (seconds since the first request, backend, state)
        self.origin: float | None = None
        self.started = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                text = httpx.get(self.url + "/metrics", timeout=1).text
            except httpx.HTTPError:
                continue
            now = time.monotonic()
            lines = text.splitlines()
            if self.origin is None:
                busy = sum(
                    float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("tailserve:gateway_in_flight{")
                )
                if not busy:
                    continue
                self.origin = now - 0.05  # half a period: the first request came within the last 0.1 s
                self.started.set()
            for line in lines:
                if line.startswith("tailserve:gateway_breaker_state{"):
                    backend = line.split('backend="')[1].split('"')[0]
                    self.samples.append((now - self.origin, backend, int(float(line.rsplit(" ", 1)[1]))))


def start_backend(port: int) -> subprocess.Popen[bytes]:
    log = open(RESULTS / f"faults-backend-{port}.log", "a")  # noqa: SIM115 (lives as long as the process)
    cmd = tailserve_cmd(port, "--max-num-seqs", "16")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--kill-at", type=float, default=10.0, help="seconds into the run")
    ap.add_argument("--down-for", type=float, default=15.0, help="seconds before the restart")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    urls = [f"http://127.0.0.1:{p}" for p in PORTS]
    procs = [start_backend(p) for p in PORTS]
    config = RESULTS / "faults-gateway.yaml"
    config.write_text(
        json.dumps(
            {
                "poll_interval": 0.5,
                "breaker": {"failures": 3, "window": 5, "open_for": 2, "successes": 2},
                "models": {MODEL: {"backends": [{"url": u, "kind": "tailserve"} for u in urls]}},
            }
        )
    )
    gw_cmd = [
        sys.executable,
        "-m",
        "tailserve.cli",
        "gateway",
        "--config",
        str(config),
        "--port",
        str(GATEWAY_PORT),
    ]
    events: dict[str, float] = {}
    try:
        for u, p in zip(urls, procs, strict=True):
            end = time.monotonic() + 600
            while not _up(u):
                if p.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"backend {u} did not start; see {RESULTS}")
                time.sleep(0.5)
        with serving(gw_cmd, GATEWAY_PORT, RESULTS / "faults-gateway.log") as gw:
            sampler = Sampler(gw)
            threading.Thread(target=sampler.run, daemon=True).start()

            def fault() -> None:
                if not sampler.started.wait(120):
                    return
                assert sampler.origin is not None
                time.sleep(max(0.0, sampler.origin + args.kill_at - time.monotonic()))
                os.killpg(procs[0].pid, signal.SIGKILL)
                procs[0].wait()
                events["killed"] = time.monotonic() - sampler.origin
                time.sleep(args.down_for)
                procs[0] = start_backend(PORTS[0])
                events["restarted"] = time.monotonic() - sampler.origin
                while not _up(urls[0]):
                    time.sleep(0.2)
                events["ready"] = time.monotonic() - sampler.origin

            faulter = threading.Thread(target=fault, daemon=True)
            faulter.start()
            run = bench(
                gw,
                RESULTS / "faults-bench",
                "--workload", "chat", "--concurrency", str(args.concurrency),
                "--requests", str(args.requests), "--output-tokens", str(args.output_tokens),
                "--seed", "0", "--no-plots", "--model", MODEL,
                "--warmup", "0",  # warm-up requests would start the sampler's clock before the bench's
            )  # fmt: skip
            faulter.join(timeout=120)
            time.sleep(5)  # the restarted backend's breaker closes on its first requests, or stays half-open
            sampler.stop.set()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    report(run, sampler.samples, events, urls[0] + "/v1", args)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def report(run: dict, samples: list, events: dict, killed: str, args: argparse.Namespace) -> None:
    reqs = run["requests"]
    failed = [r for r in reqs if r["status"] != "ok"]
    failed_streaming = [r for r in failed if r["ttft_s"] is not None]
    killed_at, ready_at = events.get("killed", 0.0), events.get("ready", 0.0)
    transitions = []
    last = None
    for t, backend, state in samples:
        if backend == killed and state != last:
            transitions.append((round(t, 2), STATE_NAMES[state]))
            last = state

    def window(lo: float, hi: float) -> list[float]:
        return [r["ttft_s"] for r in reqs if r["status"] == "ok" and lo <= r["start_s"] < hi]

    end = max(r["start_s"] for r in reqs) + 1
    phases = {"before": (0, killed_at), "outage": (killed_at, ready_at), "after": (ready_at, end)}
    summary = {
        "requests": len(reqs),
        "failed": len(failed),
        "failed_not_streaming": len(failed) - len(failed_streaming),
        "failed_streaming": len(failed_streaming),
        "events_s": events,
        "breaker_transitions_of_killed": transitions,
        "ttft": {
            name: {"n": len(w := window(lo, hi)), "p50_s": q(w, 0.5), "p99_s": q(w, 0.99)}
            for name, (lo, hi) in phases.items()
        },
        "config": vars(args),
    }
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "gateway_faults.json").write_text(json.dumps(summary, indent=2))
    plot(reqs, samples, events, killed)
    print(header("Gateway faults", "python benchmarks/gateway_faults.py"))
    print(json.dumps(summary, indent=2))


def plot(reqs: list[dict], samples: list, events: dict, killed: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=(2, 1))
    ok = [r for r in reqs if r["status"] == "ok"]
    bad = [r for r in reqs if r["status"] != "ok"]
    ax1.scatter([r["start_s"] for r in ok], [r["ttft_s"] * 1e3 for r in ok], s=6, label="TTFT (ok)")
    floor = min((r["ttft_s"] for r in ok), default=0.1) * 1e3
    ys = [(r["ttft_s"] * 1e3 if r["ttft_s"] is not None else floor) for r in bad]
    ax1.scatter([r["start_s"] for r in bad], ys, s=30, c="red", marker="x", label="failed (at its TTFT)")
    ax1.set_ylabel("TTFT (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right")
    for backend in sorted({b for _, b, _ in samples}):
        pts = [(t, s) for t, b, s in samples if b == backend]
        label = ("killed " if backend == killed else "other ") + backend.split("//")[1].split("/")[0]
        ax2.step([t for t, _ in pts], [s for _, s in pts], where="post", label=label)
    ax2.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    ax2.set_xlabel("seconds into the run")
    ax2.legend(loc="upper right")
    for name, t in events.items():
        for ax in (ax1, ax2):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax1.annotate(name, (t, ax1.get_ylim()[1]), fontsize=8, rotation=90, va="top")
    fig.tight_layout()
    fig.savefig(RECORDED / "gateway_faults.png", dpi=90)


if __name__ == "__main__":
    main()
