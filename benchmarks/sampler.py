"""The sampler's time per step: a [16, 49152] fp32 batch (the default model's vocabulary, 16 streams),
each row with the same parameters, on flat rows (logits ~ N(0, 3²)) and peaked ones (N(0, 12²): a
range past ~90 after temperature, where float32 exp returns subnormals). Median of `--calls` calls.

    PYTHONPATH=src .venv/bin/python benchmarks/sampler.py [--calls 30]

To compare two checkouts, run it with each one's `src` on PYTHONPATH, alternately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tailserve.layers.sampler import Sampler, SampleRow
from tailserve.sampling import SamplingParams

CASES = {
    "temperature 0.8": SamplingParams(temperature=0.8),
    "temperature 0.8, top-p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "top-k 50, top-p 0.9": SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
    "greedy, 5 logprobs": SamplingParams(temperature=0.0, logprobs=5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    for rows_kind, scale in (("flat", 3.0), ("peaked", 12.0)):
        logits = (np.random.default_rng(0).standard_normal((16, 49152)) * scale).astype(np.float32)
        for name, params in CASES.items():
            rows = [SampleRow(params, np.random.default_rng(i), []) for i in range(16)]
            sampler = Sampler(0)
            times = []
            for _ in range(args.calls + 1):
                batch = logits.copy()
                t0 = time.perf_counter()
                sampler(batch, rows)
                times.append(time.perf_counter() - t0)
            print(f"{rows_kind:6s} {name:28s} {statistics.median(times[1:]) * 1e3:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
