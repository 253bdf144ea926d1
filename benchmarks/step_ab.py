"""A/B of the fused step's C++ kernels against another revision's, in one process, on one batch.

This machine's speed drifts 10–30 % over tens of seconds, so two processes timed one after the other
cannot resolve a 5 % change. Here the base revision's `csrc/` is compiled as a second module and bound
to the same packed weights, and the two builds run the same batch call by call, alternating which goes
first, 6 ms apart (an idle thread team parks after 3 ms, so neither spins while the other runs).
Prints each build's median step time and phases, the median of the per-pair ratios, and the largest
logit difference between the builds (0 where a change should not move a number).

Batches (seeded chat workload, default model and precision, as `tailserve serve` runs them):
  prefill: the first step of a burst of `--streams` new chat prompts (at 16: 128 prompt rows at ~450
           tokens of context, the step that the 16-stream p99 TTFT waits on seven times over);
  decode:  one decode step of those sequences.

    .venv/bin/python benchmarks/step_ab.py --base HEAD~1 [--batch prefill,decode] [--streams 16] [--pairs 40]

`--pairs 0` compares the logits only (no timing: it needs no quiet machine, nothing is recorded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from harness import RECORDED, ROOT, commit
from offline import chat_prompts

from tailserve.engine.scheduler import SchedulerOutput
from tailserve.layers import kernels
from tailserve.llm import LLM
from tailserve.sampling import SamplingParams

CSRC = "src/tailserve/csrc"


def git(*argv: str) -> bytes:
    return subprocess.run(["git", *argv], capture_output=True, check=True, cwd=ROOT).stdout


def base_sources(rev: str, into: Path) -> Path:
    """The kernels' sources as they were at `rev`."""
    for name in git("ls-tree", "--name-only", rev, f"{CSRC}/").decode().split():
        (into / Path(name).name).write_bytes(git("show", f"{rev}:{name}"))
    return into


def batches(llm: LLM, streams: int) -> Iterator[tuple[str, SchedulerOutput]]:
    """The burst's first step, then (the engine run on until every prompt decodes) a decode step. Each
    is timed before the engine moves on: a scheduled step reads its sequences' progress."""
    eng = llm.engine
    prompts = chat_prompts(llm, 64, 1)
    llm.generate(prompts[:32], SamplingParams(max_tokens=2, temperature=0.0))  # the system prompt cached
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts[32 : 32 + streams]):
        eng.add_request(f"burst-{i}", p, params)
    sched = eng.scheduler.schedule()
    if sched.copies:
        eng.runner.copy_blocks(sched.copies)
    yield "prefill", sched
    while True:
        eng._run(sched, time.perf_counter())  # the step as the engine runs it
        sched = eng.scheduler.schedule()
        if len(sched.scheduled) == streams and all(s.num_new_tokens == 1 for s in sched.scheduled):
            yield "decode", sched
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD~1", help="git revision whose kernels are the baseline")
    ap.add_argument("--batch", default="prefill,decode")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--streams", type=int, default=16, help="prompts in the burst (1 to 32)")
    args = ap.parse_args()
    base_rev = git("rev-parse", "--short", args.base).decode().strip()
    with tempfile.TemporaryDirectory() as tmp:
        base_mod = kernels.build(base_sources(args.base, Path(tmp)), "tailserve_kernels_base")
    llm = LLM()
    model, runner = llm.engine.runner.model, llm.engine.runner
    impls = {"base": model.make_impl(model.threads, base_mod), "head": model.impl}
    results = {}
    for name, sched in batches(llm, args.streams):
        if name not in args.batch.split(","):
            continue
        logits = {}
        for k, impl in impls.items():
            model.impl = impl
            logits[k] = runner.run(sched.scheduled).logits.copy()
        diff = float(np.abs(logits["base"] - logits["head"]).max())
        if args.pairs == 0:
            print(f"{name} ({sched.num_tokens} rows): max |logit diff| {diff:.3g}", flush=True)
            continue
        times: dict[str, list[float]] = {k: [] for k in impls}
        for impl in impls.values():
            impl.take_phase_seconds()
        for i in range(args.pairs):
            for k in ("base", "head") if i % 2 == 0 else ("head", "base"):
                model.impl = impls[k]
                time.sleep(0.006)
                t0 = time.perf_counter()
                runner.run(sched.scheduled)
                times[k].append(time.perf_counter() - t0)
        ratio = statistics.median(h / b for h, b in zip(times["head"], times["base"], strict=True))
        row = {"rows": sched.num_tokens, "max_logit_diff": diff, "head_over_base": ratio}
        for k, impl in impls.items():
            phases = impl.take_phase_seconds()
            row[k] = {
                "median_ms": statistics.median(times[k]) * 1e3,
                "phases_ms": {p: v * 1e3 / args.pairs for p, v in phases.items() if v},
            }
        results[name] = row
        print(
            f"{name} ({row['rows']} rows): base {base_rev} {row['base']['median_ms']:.2f} ms, "
            f"head {commit()} {row['head']['median_ms']:.2f} ms, head/base per pair {ratio:.3f}, "
            f"max |logit diff| {diff:.3g}",
            flush=True,
        )
        for k in impls:
            print(f"  {k} phases (ms):", {p: round(v, 2) for p, v in row[k]["phases_ms"].items()})
    model.impl = impls["head"]
    if not results:
        return
    out = RECORDED / "step_ab.json"
    recorded = json.loads(out.read_text()) if out.exists() else {}
    key = f"{base_rev}..{commit()}, {args.streams} streams"
    recorded[key] = {"date": time.strftime("%Y-%m-%d"), **results}
    out.write_text(json.dumps(recorded, indent=2))


if __name__ == "__main__":
    main()
