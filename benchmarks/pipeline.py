"""The example assistant (examples/assistant) on a real `tailserve serve`: what each part of
tailserve.pipeline buys, A against B in the same run.

Parts (each a pair of assistant processes in front of one server, driven alternately round by round
with the same seeded `pipeline` workload, so drift hits both alike):
  tools        the model's tool calls run in parallel vs one after another (e2e p50/p95)
  caches       retrieval / policy / summary caches on vs off, on FAQ traffic that repeats questions
  compression  on vs off with 2k- and 4k-token histories: TTFT, e2e, and how often the answer is the
               same as the uncompressed one (greedy decoding, the same sessions)
  slow         a share of tool calls stalling: p99 e2e and share of degraded answers, budgets on vs off

Run: flock /work/bench.lock python benchmarks/pipeline.py [--parts tools,caches,compression,slow]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from harness import RESULTS, ROOT, commit, header, serving, tailserve_cmd

from tailserve.bench.client import ClientConfig, RequestRecord
from tailserve.bench.runner import Load, Runner
from tailserve.bench.stats import percentile
from tailserve.bench.workloads import WorkloadParams, build_workload

APP = ROOT / "examples" / "assistant" / "app.py"
PARTS = ("tools", "caches", "compression", "slow")


@contextlib.contextmanager
def apps(llm_url: str, configs: dict[str, list[str]], port: int, logs: Path) -> Iterator[dict[str, str]]:
    """One assistant process per config, on consecutive ports."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for i, (label, flags) in enumerate(configs.items()):
            cmd = [sys.executable, str(APP), "--llm-url", llm_url, "--port", str(port + i), *flags]
            urls[label] = stack.enter_context(
                serving(cmd, port + i, logs / f"app-{label}.log", 120, "/health")
            )
        yield urls


async def drive(
    url: str, name: str, n: int, seed: int, concurrency: int, params: WorkloadParams
) -> list[RequestRecord]:
    cfg = ClientConfig(base_url=url, model="assistant", ignore_eos=False, temperature=0.0, timeout=180.0)
    runner = Runner(cfg)
    try:
        res = await runner.run(build_workload(name, n, seed, params), Load("closed", concurrency), 1800.0)
    finally:
        await runner.aclose()
    return res.records


def run_part(
    llm_url: str,
    configs: dict[str, list[str]],
    rounds: int,
    n: int,
    concurrency: int,
    params: WorkloadParams,
    port: int,
    logs: Path,
    seed: int = 0,
) -> dict[str, dict]:
    """Alternate the configs round by round; each round sends the same requests (seed + round)."""
    out: dict[str, dict] = {k: {"records": []} for k in configs}
    with apps(llm_url, configs, port, logs) as urls:
        for url in urls.values():  # warm-up: connections, the server's prefix cache for the system prompt
            asyncio.run(drive(url, "pipeline", 2, 999, 1, WorkloadParams(output_tokens=params.output_tokens)))
            httpx.post(url + "/report/reset")
        for r in range(rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for label in order:
                recs = asyncio.run(drive(urls[label], "pipeline", n, seed + r, concurrency, params))
                out[label]["records"] += recs
        for label, url in urls.items():
            out[label]["report"] = httpx.get(url + "/report").json()
            out[label]["metrics"] = httpx.get(url + "/metrics").text
    return out


def dist(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {f"p{q}": round(percentile(s, q), 3) for q in (50, 95, 99)} | {"n": len(s)} if s else {}


def summary(part: dict) -> dict:
    recs: list[RequestRecord] = part["records"]
    ok = [r for r in recs if r.status == "ok"]
    return {
        "requests": len(recs),
        "ok": len(ok),
        "e2e_s": dist([r.e2e for r in ok if r.e2e is not None]),
        "ttft_s": dist([r.ttft for r in ok if r.ttft is not None]),
        "degraded_share": part["report"]["degraded_share"],
        "stages": {s["stage"]: s for s in part["report"]["stages"]},
        "tool_calls": part["report"]["tool_calls"],
        "tool_stalls": part["report"]["tool_stalls"],
    }


def cache_counts(metrics: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in metrics.splitlines():
        for kind in ("hits", "misses"):
            prefix = f'tailserve:pipeline_cache_{kind}_total{{cache="'
            if line.startswith(prefix):
                name = line[len(prefix) :].split('"')[0]
                out.setdefault(name, {})[kind] = float(line.rsplit(" ", 1)[1])
    return out


def agreement(a: list[RequestRecord], b: list[RequestRecord]) -> dict[str, float]:
    """Answers of the same requests (by id within each round's order): identical share, mean similarity."""
    pairs = list(zip(sorted(a, key=lambda r: (r.id, r.start)), sorted(b, key=lambda r: (r.id, r.start))))
    norm = [(" ".join(x.text.split()).lower(), " ".join(y.text.split()).lower()) for x, y in pairs]
    same = sum(x == y for x, y in norm)
    sim = [difflib.SequenceMatcher(None, x, y).ratio() for x, y in norm]
    return {
        "pairs": len(pairs),
        "identical": round(same / len(pairs), 3),
        "similarity": round(sum(sim) / len(sim), 3),
    }


@dataclass
class Ctx:
    llm: str
    args: argparse.Namespace
    base: WorkloadParams
    port: int
    out_dir: Path
    result: dict

    def run(self, configs: dict[str, list[str]], n: int, params: WorkloadParams | None = None) -> dict:
        a = self.args
        return run_part(
            self.llm, configs, a.rounds, n, a.concurrency, params or self.base, self.port, self.out_dir
        )

    def save(self, name: str, part: dict) -> None:
        self.result["parts"][name] = part
        print(name, json.dumps(part, indent=1), flush=True)


LOOSE = ["--slo-s", "120"]  # parts other than `slow` measure speed, not budgets: nothing degrades


def part_tools(c: Ctx) -> None:
    res = c.run({"parallel": LOOSE, "sequential": [*LOOSE, "--parallel-tools", "off"]}, c.args.requests)
    c.save("tools", {k: summary(v) for k, v in res.items()})


def part_caches(c: Ctx) -> None:
    res = c.run({"on": LOOSE, "off": [*LOOSE, "--caches", "off"]}, c.args.requests)
    c.save("caches", {k: summary(v) | {"caches": cache_counts(v["metrics"])} for k, v in res.items()})


def part_compression(c: Ctx) -> None:
    for hist in (2000, 4000):
        params = WorkloadParams(output_tokens=c.args.output_tokens, history_tokens=hist)
        configs = {"on": [*LOOSE, "--compression", "on"], "off": [*LOOSE, "--compression", "off"]}
        res = c.run(configs, max(2, c.args.requests // 2), params)
        part = {k: summary(v) for k, v in res.items()}
        part["agreement"] = agreement(res["on"]["records"], res["off"]["records"])
        part["compression_counters"] = [
            ln
            for ln in res["on"]["metrics"].splitlines()
            if ln.startswith("tailserve:pipeline_compression") and not ln.startswith("#")
        ]
        c.save(f"compression_{hist}", part)


def part_slow(c: Ctx) -> None:
    a = c.args
    slo = a.slo
    if slo is None:
        tools = c.result["parts"].get("tools", {}).get("parallel", {}).get("e2e_s", {})
        slo = round(1.5 * tools["p95"], 1) if tools else 10.0
    stall = ["--stall-share", str(a.stall_share), "--stall-s", str(a.stall_s)]
    configs = {"budgets_on": [*stall, "--slo-s", str(slo)], "budgets_off": [*stall, "--budgets", "off"]}
    res = c.run(configs, 2 * a.requests)
    part = {k: summary(v) for k, v in res.items()}
    part["slo_s"] = slo
    for k, v in res.items():
        e2e = [r.e2e for r in v["records"] if r.e2e is not None]
        part[k]["within_slo"] = round(sum(x <= slo for x in e2e) / len(e2e), 3) if e2e else None
    c.save("slow", part)


PART_FNS = {"tools": part_tools, "caches": part_caches, "compression": part_compression, "slow": part_slow}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=12, help="per config per round")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--output-tokens", type=int, default=48)
    p.add_argument("--stall-share", type=float, default=0.2)
    p.add_argument("--stall-s", type=float, default=8.0)
    p.add_argument("--slo", type=float, help="seconds (default: 1.5 x the tools part's parallel p95 e2e)")
    p.add_argument("--port", type=int, default=8710)
    p.add_argument("--llm-url", help="use this server (or gateway) instead of starting `tailserve serve`")
    a = p.parse_args()
    parts = a.parts.split(",")
    out_dir = RESULTS / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    base = WorkloadParams(output_tokens=a.output_tokens)
    result: dict = {"commit": commit(), "args": vars(a), "parts": {}}
    server = (
        contextlib.nullcontext(a.llm_url)
        if a.llm_url
        else serving(tailserve_cmd(a.port), a.port, out_dir / "server.log")
    )
    with server as llm:
        ctx = Ctx(llm, a, base, a.port + 1, out_dir, result)
        for name in parts:  # in the order given: the first parts finish even if the run is cut short
            PART_FNS[name](ctx)
            (out_dir / "pipeline.json").write_text(json.dumps(result, indent=1))
    print(header("Pipeline", "python benchmarks/pipeline.py " + " ".join(sys.argv[1:])))
    print("wrote", out_dir / "pipeline.json")


if __name__ == "__main__":
    main()
