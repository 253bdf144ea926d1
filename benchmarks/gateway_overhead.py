"""What the gateway adds: the same tailserve backend measured directly, through `tailserve gateway`, and
through the LiteLLM proxy (`litellm[proxy]` from PyPI), in one run.

All three endpoints are up at once in front of ONE `tailserve serve`; each round runs `tailserve bench
--workload chat` against each of them at concurrency 1 and 16 (seed = round, so the three see the same
prompts in the same order), the endpoints' order cycling through every permutation so that each takes
each place, and follows each other, equally often (harness.round_order; the machine's drift and whatever
one run leaves the next hit all alike: with the order only reversed, the middle endpoint of three never
ran first or last); before each, one unrecorded pass of the same prompts warms the backend's prefix
cache for all three alike. Reported, pooled over rounds: TTFT p50/p99 and ITL p50 per endpoint, the
added TTFT (p50 and p99 differences to direct, each with a 95 % interval from resampling whole rounds:
on a 2-core machine the difference moves between runs by as much as the gateway's targets, and one run's
figure says nothing without it) and the median of per-request differences (same prompt, same position in
the run).

LiteLLM lives in its own venv ($PEERS_HOME/litellm-venv, default /tmp/tailserve-peers), made on first
use with `pip install 'litellm[proxy]'`, so its pins never touch ours.

    .venv/bin/python benchmarks/gateway_overhead.py [--rounds 6] [--requests-c1 16] [--requests-c16 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
from pathlib import Path

from harness import (
    RECORDED,
    RESULTS,
    added_interval,
    closed_loop,
    header,
    quantile,
    round_order,
    serving,
    tailserve_cmd,
)

MODEL = "smollm2-135m-instruct"
PORTS = {"backend": 8130, "direct": 8130, "gateway": 8131, "litellm": 8132}
LITELLM_KEY = "sk-" + secrets.token_hex(16)  # the proxy refuses to start without one
PEERS_HOME = Path(os.environ.get("PEERS_HOME", "/tmp/tailserve-peers"))


def litellm_bin() -> Path:
    venv = PEERS_HOME / "litellm-venv"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def litellm_cmd(backend: str, port: int) -> list[str]:
    config = RESULTS / "litellm.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {backend}/v1\n"
        "      api_key: none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  num_retries: 0\n"
        "  drop_params: false\n"
    )
    return [str(litellm_bin()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


def pooled(runs: list[dict], key: str) -> list[float]:
    out: list[float] = []
    for run in runs:
        for r in run["requests"]:
            if r["status"] != "ok":
                continue
            value = r[key]
            out.extend(value if isinstance(value, list) else [value])
    return out


def paired_ttft(a: list[dict], b: list[dict]) -> list[float]:
    """b − a TTFT for each request both ran (same round, same request id)."""
    diffs = []
    for ra, rb in zip(a, b, strict=True):
        ta = {r["id"]: r["ttft_s"] for r in ra["requests"] if r["status"] == "ok"}
        diffs += [r["ttft_s"] - ta[r["id"]] for r in rb["requests"] if r["status"] == "ok" and r["id"] in ta]
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="a multiple of the orders (2 or 6) balances")
    ap.add_argument("--requests-c1", type=int, default=16)
    ap.add_argument("--requests-c16", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument(
        "--backend-flags", default="", help='extra `tailserve serve` flags, e.g. "--num-threads 1"'
    )
    ap.add_argument("--tag", default="", help="suffix of the recorded summary's file name")
    args = ap.parse_args()
    names = ["direct", "gateway"] + ([] if args.no_litellm else ["litellm"])
    runs: dict[str, dict[int, list[dict]]] = {n: {1: [], 16: []} for n in names}
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(
            serving(
                tailserve_cmd(PORTS["backend"], "--max-num-seqs", "16", *args.backend_flags.split()),
                PORTS["backend"],
                RESULTS / "gw-backend.log",
            )
        )
        gw_cmd = [sys.executable, "-m", "tailserve.cli", "gateway", "--backend", backend]
        urls = {
            "direct": backend,
            "gateway": stack.enter_context(
                serving(
                    [*gw_cmd, "--port", str(PORTS["gateway"])], PORTS["gateway"], RESULTS / "gw-gateway.log"
                )
            ),
        }
        if not args.no_litellm:
            urls["litellm"] = stack.enter_context(
                serving(
                    litellm_cmd(backend, PORTS["litellm"]),
                    PORTS["litellm"],
                    RESULTS / "gw-litellm.log",
                    ready_path="/health/liveliness",  # /v1/models wants the key
                )
            )
        for r in range(args.rounds):
            order = round_order(names, r)
            for conc, n in ((1, args.requests_c1), (16, args.requests_c16)):
                # The round's prompts once directly, unrecorded: every endpoint then meets the same warm
                # prefix cache, and the first one measured is not the one that pays for filling it.
                closed_loop(urls["direct"], RESULTS / f"gateway_overhead-warm-c{conc}-r{r}", "chat", conc, n,
                            args.output_tokens, r, "--model", MODEL)  # fmt: skip
                for name in order:
                    out = RESULTS / f"gateway_overhead-{name}-c{conc}-r{r}"
                    flags = ["--warmup", "2", "--model", MODEL]
                    if name == "litellm":
                        flags += ["--api-key", LITELLM_KEY]
                    run = closed_loop(urls[name], out, "chat", conc, n, args.output_tokens, r, *flags)
                    runs[name][conc].append(run)
                    ok = run["summary"]["counts"]["ok"]
                    print(f"round {r} c={conc} {name}: ok {ok}/{n}", flush=True)
    summary: dict[str, dict] = {}
    for name in names:
        for conc in (1, 16):
            ttft, itl = pooled(runs[name][conc], "ttft_s"), pooled(runs[name][conc], "itl_s")
            failed = sum(len(run["requests"]) - len(pooled([run], "ttft_s")) for run in runs[name][conc])
            summary[f"{name}-c{conc}"] = {
                "ttft_p50_s": quantile(ttft, 0.5),
                "ttft_p99_s": quantile(ttft, 0.99),
                "itl_p50_s": quantile(itl, 0.5),
                "itl_p99_s": quantile(itl, 0.99),
                "requests_ok": len(ttft),
                "requests_failed": failed,
            }
            if name != "direct":
                entry = summary[f"{name}-c{conc}"]
                entry["ttft_paired_median_diff_s"] = statistics.median(
                    paired_ttft(runs["direct"][conc], runs[name][conc])
                )
                base = [pooled([run], "ttft_s") for run in runs["direct"][conc]]
                other = [pooled([run], "ttft_s") for run in runs[name][conc]]
                for p, key in ((0.5, "p50"), (0.99, "p99")):
                    _, low, high = added_interval(base, other, p)
                    entry[f"ttft_added_{key}_ci95_s"] = [low, high]
    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / f"gateway_overhead{'-' + args.tag if args.tag else ''}.json").write_text(
        json.dumps({"config": vars(args), "summary": summary}, indent=2)
    )
    print(header("Gateway overhead", "python benchmarks/gateway_overhead.py"))
    print(
        "| endpoint | conc | ok | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | added p50 [95 % CI] "
        "| added p99 [95 % CI] | paired |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for conc in (1, 16):
        d = summary[f"direct-c{conc}"]
        for name in names:
            s = summary[f"{name}-c{conc}"]
            cells = [name, str(conc), f"{s['requests_ok']}/{s['requests_ok'] + s['requests_failed']}"]
            cells += [f"{s[k] * 1e3:.1f} ms" for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")]
            if name == "direct":
                cells += ["", "", ""]
            else:
                for key in ("p50", "p99"):
                    low, high = s[f"ttft_added_{key}_ci95_s"]
                    added = s[f"ttft_{key}_s"] - d[f"ttft_{key}_s"]
                    cells.append(f"{added * 1e3:+.1f} ms [{low * 1e3:+.1f}, {high * 1e3:+.1f}]")
                cells.append(f"{s['ttft_paired_median_diff_s'] * 1e3:+.1f} ms")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
