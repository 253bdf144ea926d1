"""This machine's ceilings, measured, and a serving run's achieved share of them.

Decode reads every weight once per step (and each stream's KV), so a step cannot beat
bytes / read bandwidth; a batched run cannot beat its FLOPs / the precision's multiply-add rate.
The shares say how far from the machine's limit a figure is, whoever serves it.

    .venv/bin/python benchmarks/ceilings.py      # prints the measured ceilings
"""

from __future__ import annotations

import json
import time

import torch

REPEATS = 5


def _best_seconds(fn, repeats: int = REPEATS) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int = 2) -> dict[str, float]:
    """Read bandwidth (GB/s, a 512 MB fp32 sum) and bf16 GEMM rate (GFLOP/s, 2048³), best of a few.
    vpdpbusd (int8 VNNI) runs at vdpbf16ps' instruction rate with twice its multiply-adds (both measured
    at 3.56 G instructions/s per core here), so the int8 ceiling is taken as twice the bf16 one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(128 * 1024 * 1024)
        bw = x.nbytes / _best_seconds(x.sum) / 1e9
        del x
        a = torch.randn(2048, 2048, dtype=torch.bfloat16)
        bf16 = 2 * 2048**3 / _best_seconds(lambda: a @ a) / 1e9
    finally:
        torch.set_num_threads(before)
    return {"read_gb_s": bw, "bf16_gflop_s": bf16, "int8_gop_s": 2 * bf16}


# What one decode step of SmolLM2-135M reads and computes, per server's precision.
PARAMS = 134.5e6  # all weights, the tied head included (the head is a full matmul every step)
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2  # layers · KV heads · head dim · (K, V) · bf16
WEIGHT_BYTES = {  # bytes of weights one step reads
    "tailserve": 98.2e6,  # int4 (Q4_1's own values) with an int8 head: the packed size (kernels.py)
    "llamacpp": 98.4e6,  # the Q4_1 GGUF as it is
    "vllm": 2 * PARAMS,  # bf16
}
PEAK_KEY = {"tailserve": "int8_gop_s", "llamacpp": "int8_gop_s", "vllm": "bf16_gflop_s"}


def shares(server: str, row: dict, concurrency: int, ceil: dict[str, float], output_tokens: int) -> dict:
    """A peers.py row's share of the ceilings: bandwidth, as the bytes a decode step reads (weights and
    each stream's KV at its mean context) over the median inter-token gap; compute, as the decode
    FLOPs of the output tokens per second (a lower bound: prefill and attention left out)."""
    ctx = row["prompt_tokens_mean"] + output_tokens / 2
    step_bytes = WEIGHT_BYTES[server] + concurrency * ctx * KV_BYTES_PER_TOKEN
    bw = step_bytes / row["itl_p50"] / 1e9 / ceil["read_gb_s"]
    compute = row["output_tok_s"] * 2 * PARAMS / 1e9 / ceil[PEAK_KEY[server]]
    return {"bandwidth_share": bw, "compute_share": compute}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
