"""Cold builds of one CPU tier's C++ kernels: this commit's sources and build against another revision's.

The kernel build is the largest part of a fresh machine's wait for its first token (issue 23), and this
machine's speed drifts between runs, so the two revisions are built alternately, round by round, each
time from nothing: every build is its revision's `src/` (git archive) importing its own
layers/kernels.py, in a fresh process with a fresh TAILSERVE_HOME, exactly as `tailserve fetch
--prepare` builds. Prints each build's wall time and CPU time (the compiler's and ninja's, all
descendants), the medians, and the median of the per-round wall ratios.

    PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/kernel_build.py --base main [--tier T] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from harness import RECORDED, ROOT, commit

from tailserve.layers import kernels

BUILD = "from tailserve.layers import kernels; import sys; print(kernels.build(tier=sys.argv[1]).tier())"


def checkout(rev: str, into: Path) -> Path:
    """`rev`'s src/ tree, unpacked under `into`."""
    tar = subprocess.run(["git", "archive", rev, "src"], capture_output=True, check=True, cwd=ROOT).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "src"


def cold_build(src: Path, tier: str) -> tuple[float, float]:
    """Wall and CPU seconds of one build of `tier` from `src`, into a cache of its own."""
    with tempfile.TemporaryDirectory(prefix="tailserve-build-") as home:
        env = {**os.environ, "PYTHONPATH": str(src), "TAILSERVE_HOME": home}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", BUILD, tier], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0 or out.stdout.split()[-1:] != [tier]:
        raise RuntimeError(f"build of {tier} from {src} failed:\n{out.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="git revision whose build is the baseline")
    ap.add_argument("--tier", default=None, help="CPU tier to build (default: this CPU's best)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tier = args.tier or kernels.choose_tier()
    revs = {"base": args.base, "head": "HEAD"}
    names = {
        k: subprocess.run(
            ["git", "rev-parse", "--short", r], capture_output=True, check=True, text=True, cwd=ROOT
        ).stdout.strip()
        for k, r in revs.items()
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in revs}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {k: checkout(r, Path(tmp) / k) for k, r in revs.items()}
        for i in range(args.rounds):
            for k in ("base", "head") if i % 2 == 0 else ("head", "base"):
                runs[k].append(cold_build(trees[k], tier))
                print(
                    f"round {i + 1} {k} {names[k]}: wall {runs[k][-1][0]:.1f} s, cpu {runs[k][-1][1]:.1f} s",
                    flush=True,
                )
    row = {
        k: {
            "wall_s": statistics.median(w for w, _ in v),
            "cpu_s": statistics.median(c for _, c in v),
            "runs": [{"wall_s": round(w, 2), "cpu_s": round(c, 2)} for w, c in v],
        }
        for k, v in runs.items()
    }
    ratio = statistics.median(h[0] / b[0] for h, b in zip(runs["head"], runs["base"], strict=True))
    print(
        f"{tier} cold build on {os.cpu_count()} CPUs: "
        + ", ".join(
            f"{k} {names[k]} {row[k]['wall_s']:.1f} s wall ({row[k]['cpu_s']:.1f} s CPU)" for k in revs
        )
        + f", head/base wall per round {ratio:.3f}"
    )
    out = RECORDED / "kernel_build.json"
    recorded = json.loads(out.read_text()) if out.exists() else {}
    recorded[f"{names['base']}..{commit()}, {tier}"] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "head_over_base_wall": ratio,
        **row,
    }
    out.write_text(json.dumps(recorded, indent=2))


if __name__ == "__main__":
    main()
