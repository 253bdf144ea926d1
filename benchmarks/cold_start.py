"""Cold start: a fresh machine to a first token, a process to ready, a first request against the next 20.

(a) `--fresh`: a fresh `git clone` of this commit and an empty TAILSERVE_HOME, `make serve` → the first
    streamed token (pip's own download cache is not emptied: the report says whether it was warm).
    Each milestone is timed from the `make` call: venv installed, model downloaded, /health, /ready,
    first token.
(b) start → ready with every cache warm, tailserve (process start → /ready 200) against llama.cpp's
    server (→ /health 200) on the same GGUF, in alternating rounds (order reversed every other round),
    after one unmeasured start of each. tailserve's own figure (`tailserve:startup_seconds`, from the
    process's start) and its phases are read from /metrics.
(c) in each round, right after ready: the first request's TTFT against the p50 of the next 20
    (streamed completions, distinct prompts of ~100 tokens so no prefix cache helps, 4 tokens, greedy,
    a fresh connection each: llama.cpp closes streamed connections).

    PYTHONPATH=src flock /work/bench.lock .venv/bin/python benchmarks/cold_start.py [--rounds 5] [--fresh]
        [--against ../main]

`--against DIR` adds a third server to (b) and (c): tailserve from another checkout's `src` (a
baseline commit), started in the same alternating rounds, so a change to the start is measured side
by side with what it changes (the machine drifts 10–30 % between runs).

Writes benchmarks/recorded/cold_start.json and prints the markdown rows BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from harness import PEERS, RECORDED, ROOT, header, tailserve_cmd

from tailserve.config import DEFAULT_MODEL
from tailserve.models.loader import resolve_model

PORT = 8130
WORDS = (
    "river",
    "stone",
    "cloud",
    "market",
    "garden",
    "winter",
    "signal",
    "copper",
    "lantern",
    "orchard",
    "harbor",
    "meadow",
    "quiet",
    "engine",
    "violet",
    "canyon",
    "ribbon",
    "thunder",
    "pocket",
    "marble",
)


def prompts(n: int, seed: int, words: int = 80) -> list[str]:
    """n prompts of ~100 tokens that differ from their first word on (no shared prefix)."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def ttft(url: str, model: str, prompt: str, timeout: float = 120.0) -> float:
    """Seconds from sending a streamed completion to its first text chunk (a fresh connection)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "stream": True}
    with httpx.Client(timeout=timeout) as client:
        t0 = time.perf_counter()
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        return time.perf_counter() - t0
    raise RuntimeError(f"{url}: the stream ended without text")


def wait_for(check: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.02) -> float:
    """Seconds until `check()` holds (polled), from now; raises if the process exits first."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return time.perf_counter() - t0
        time.sleep(poll)
    raise TimeoutError(f"{proc.args} not ready after {timeout} s")


def status_is(url: str, code: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=1).status_code == code


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tailserve_phases(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    found = re.finditer(r'startup_phase_seconds\{[^}]*phase="(\w+)"\} (\S+)', text)
    phases = {m[1]: float(m[2]) for m in found}
    total = re.search(r"^tailserve:startup_seconds\{[^}]*\} (\S+)$", text, re.M)
    return phases | {"startup_seconds": float(total[1]) if total else float("nan")}


def one_start(
    name: str, gguf: str, logs: Path, seed: int, measure_requests: bool, against: Path | None = None
) -> dict:
    """Start a server, time it to ready, then (optionally) the first request and the next 20.
    "baseline" is tailserve from `against`'s src folder."""
    url = f"http://127.0.0.1:{PORT}"
    env = None
    if name in ("tailserve", "baseline"):
        cmd, ready_path, model = tailserve_cmd(PORT), "/ready", DEFAULT_MODEL
        if name == "baseline" and against is not None:
            env = os.environ | {"PYTHONPATH": str(against / "src")}
    else:
        cmd = ["bash", str(PEERS / "llama_server.sh"), "serve", gguf, str(PORT), "16"]
        ready_path, model = "/health", "x"
    with started(cmd, logs / f"{name}-{seed}.log", env) as proc:
        ready = wait_for(status_is(url + ready_path), proc, timeout=300)
        row: dict = {"ready_s": ready}
        if name in ("tailserve", "baseline"):
            row["phases"] = tailserve_phases(url)
        if measure_requests:
            texts = prompts(21, seed)
            row["first_ttft_s"] = ttft(url, model, texts[0])
            row["next_ttft_s"] = [ttft(url, model, p) for p in texts[1:]]
    return row


def llama_built() -> bool:
    """Whether the peer's binary is there (the coordinator builds it; llama_server.sh would build it
    again, into the same folder, if it were started before that build ended)."""
    peers_home = Path(os.environ.get("PEERS_HOME", "/tmp/tailserve-peers"))
    return (peers_home / "llama.cpp" / "build" / "bin" / "llama-server").is_file()


def warm_rounds(rounds: int, logs: Path, against: Path | None = None) -> dict:
    gguf = str(resolve_model(DEFAULT_MODEL))
    names = ["tailserve", "llamacpp"] if llama_built() else ["tailserve"]
    if len(names) == 1:
        print("llama.cpp's server is not built: tailserve alone", flush=True)
    if against is not None:
        names.insert(1, "baseline")
    for name in names:  # unmeasured: every cache (weights, kernels, metadata, page cache) warm
        one_start(name, gguf, logs, seed=-1, measure_requests=False, against=against)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(one_start(name, gguf, logs, seed=r, measure_requests=True, against=against))
            print(f"round {r} {name}: ready {runs[name][-1]['ready_s']:.2f} s", flush=True)
    summary = {}
    for name, rows in runs.items():
        ratios = [row["first_ttft_s"] / statistics.median(row["next_ttft_s"]) for row in rows]
        summary[name] = {
            "ready_s_median": statistics.median(row["ready_s"] for row in rows),
            "ready_s": [row["ready_s"] for row in rows],
            "first_ttft_s_median": statistics.median(row["first_ttft_s"] for row in rows),
            "next20_ttft_p50_median": statistics.median(statistics.median(r["next_ttft_s"]) for r in rows),
            "first_over_p50": ratios,
            "first_over_p50_median": statistics.median(ratios),
        }
    for name in ("tailserve", "baseline"):
        if name in runs:
            ts = runs[name]
            summary[name]["phases_median"] = {
                k: statistics.median(row["phases"][k] for row in ts) for k in ts[0]["phases"]
            }
    if "baseline" in summary:
        # Per round, the two starts ran back to back: their ratio cancels the drift between rounds.
        paired = [t["ready_s"] / b["ready_s"] for t, b in zip(runs["tailserve"], runs["baseline"])]
        summary["ready_ratio_tailserve_over_baseline_per_round"] = paired
        summary["ready_ratio_tailserve_over_baseline_median"] = statistics.median(paired)
    if "llamacpp" in summary:
        summary["ready_ratio_tailserve_over_llamacpp"] = (
            summary["tailserve"]["ready_s_median"] / summary["llamacpp"]["ready_s_median"]
        )
    return {"runs": runs, "summary": summary}


def fresh(logs: Path) -> dict:
    """A fresh clone and an empty TAILSERVE_HOME: `make serve` → first streamed token."""
    git = ["git", "-C", str(ROOT), "rev-parse", "HEAD"]
    head = subprocess.run(git, capture_output=True, text=True, check=True).stdout
    pip_cache = subprocess.run(
        ["python3", "-m", "pip", "cache", "dir"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="tailserve-fresh-") as tmp:
        clone, home = Path(tmp) / "clone", Path(tmp) / "home"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", head.strip()], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["TAILSERVE_HOME"] = str(home)
        url = f"http://127.0.0.1:{PORT}"
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        with started(["make", "-C", str(clone), "serve", f"PORT={PORT}"], logs / "fresh.log", env) as proc:
            stamp, model = clone / ".venv" / ".installed", home / "models"
            while "ready" not in marks:
                if proc.poll() is not None:
                    raise RuntimeError(f"make serve exited with {proc.returncode}; see {logs / 'fresh.log'}")
                now = time.perf_counter() - t0
                if "installed" not in marks and stamp.exists():
                    marks["installed"] = now
                if "model" not in marks and any(model.glob("*.verified")):
                    marks["model"] = now
                with contextlib.suppress(httpx.HTTPError):
                    if "health" not in marks and httpx.get(url + "/health", timeout=1).status_code == 200:
                        marks["health"] = now
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        marks["ready"] = time.perf_counter() - t0
                if now > 1800:
                    raise TimeoutError("make serve not ready after 30 min")
                time.sleep(0.1)
            first = ttft(url, DEFAULT_MODEL, prompts(1, 0)[0])
            marks["first_token"] = time.perf_counter() - t0
            marks["first_ttft"] = first
    return {"marks_s": marks, "pip_cache": pip_cache, "pip_cache_warm": Path(pip_cache).is_dir()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="warm rounds, (b) and (c); 0: (a) alone")
    p.add_argument("--fresh", action="store_true", help="also (a): a fresh clone and cache, make serve")
    p.add_argument("--against", type=Path, help="(b), (c): also tailserve from this checkout (a baseline)")
    args = p.parse_args()
    logs = ROOT / "benchmarks" / "results" / "cold_start"
    command = "PYTHONPATH=src flock /work/bench.lock .venv/bin/python benchmarks/cold_start.py"
    command += (" --fresh" if args.fresh else "") + (f" --against {args.against}" if args.against else "")
    result: dict = {"header": header("Cold start", command)}
    result["load_average_at_start"] = os.getloadavg()  # other workers share the cores
    if args.fresh:
        result["fresh"] = fresh(logs)
        print(json.dumps(result["fresh"], indent=1), flush=True)
    RECORDED.mkdir(parents=True, exist_ok=True)
    out = RECORDED / ("cold_start_fresh.json" if not args.rounds else "cold_start.json")
    if args.against is not None and args.rounds:
        out = RECORDED / "cold_start_ab.json"  # the side-by-side run keeps the plain one's record
    if args.rounds:
        result |= warm_rounds(args.rounds, logs, args.against)
    result["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.rounds:
        return
    s = result["summary"]
    print(json.dumps(s, indent=1))
    if "baseline" in s:
        print(
            f"tailserve / baseline, start → ready, median of per-round ratios: "
            f"{s['ready_ratio_tailserve_over_baseline_median']:.3f}"
        )
    print("| server | start → ready, median (s) | first TTFT (s) | next 20 TTFT p50 (s) | first / p50 |")
    print("|---|---|---|---|---|")
    for name in ("tailserve", "baseline", "llamacpp"):
        if name not in s:
            continue
        r = s[name]
        print(
            f"| {name} | {r['ready_s_median']:.2f} | {r['first_ttft_s_median']:.3f} | "
            f"{r['next20_ttft_p50_median']:.3f} | {r['first_over_p50_median']:.2f} |"
        )


if __name__ == "__main__":
    main()
