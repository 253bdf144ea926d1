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

from tailserve.layers import kernels

REPEATS = 5


def _best_seconds(fn, repeats: int = REPEATS) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int = 2, tier: str | None = None) -> dict[str, float | str]:
    """Read bandwidth (GB/s, a 512 MB fp32 sum, best of a few) and the CPU tier's own multiply-add
    rates (its kernels' int8 and bf16-pair dot products, register-resident, csrc/ops.cpp:
    peak_macs), so an AVX2 machine's shares are of what AVX2 can do, not of an emulated bf16 GEMM."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(128 * 1024 * 1024)
        bw = x.nbytes / _best_seconds(x.sum) / 1e9
        del x
    finally:
        torch.set_num_threads(before)
    tier = tier or kernels.choose_tier()
    ops = kernels.ops(tier)
    best = {"int8_macs_per_s": 0.0, "bf16_macs_per_s": 0.0}
    for _ in range(REPEATS):
        for k, v in ops.peak_macs(threads, 5_000_000).items():
            best[k] = max(best[k], v)
    return {
        "tier": tier,
        "read_gb_s": bw,
        "bf16_gflop_s": 2 * best["bf16_macs_per_s"] / 1e9,
        "int8_gop_s": 2 * best["int8_macs_per_s"] / 1e9,
    }


# What one decode step of SmolLM2-135M reads and computes, per server's precision.
PARAMS = 134.5e6  # all weights, the tied head included (the head is a full matmul every step)
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2  # layers · KV heads · head dim · (K, V) · bf16
WEIGHT_BYTES = {  # bytes of weights one step reads
    "tailserve": 98.2e6,  # int4 (Q4_1's own values) with an int8 head: the packed size (kernels.py)
    "llamacpp": 98.4e6,  # the Q4_1 GGUF as it is
    "vllm": 2 * PARAMS,  # bf16
}
PEAK_KEY = {"tailserve": "int8_gop_s", "llamacpp": "int8_gop_s", "vllm": "bf16_gflop_s"}

# The same facts of the other models peers.py runs (--model), by name.
MODELS = {
    "smollm2-135m-instruct": {
        "params": PARAMS,
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
        "weight_bytes": WEIGHT_BYTES,
    },
    "gemma3-270m": {
        "params": 268.1e6,  # 167.8e6 of them the tied embedding, read whole by the head every step
        "kv_bytes_per_token": 18 * 1 * 256 * 2 * 2,  # (below the 512-token window every layer reads all)
        "weight_bytes": {
            "tailserve": 268.1e6 * 1.125,  # int8 per group of 32 (the GGUF's `auto`: int8) + fp16 scales
            "llamacpp": 253.1e6,  # the Q4_K_M GGUF (Q5_0, Q4_K, Q6_K, Q8_0 head) as it is
            "vllm": 2 * 268.1e6,  # bf16
        },
    },
}


def shares(
    server: str,
    row: dict,
    concurrency: int,
    ceil: dict[str, float],
    output_tokens: int,
    model: str = "smollm2-135m-instruct",
) -> dict:
    """A peers.py row's share of the ceilings: bandwidth, as the bytes a decode step reads (weights and
    each stream's KV at its mean context) over the median inter-token gap; compute, as the decode
    FLOPs of the output tokens per second (a lower bound: prefill and attention left out)."""
    facts = MODELS[model]
    ctx = row["prompt_tokens_mean"] + output_tokens / 2
    step_bytes = facts["weight_bytes"][server] + concurrency * ctx * facts["kv_bytes_per_token"]
    bw = step_bytes / row["itl_p50"] / 1e9 / ceil["read_gb_s"]
    compute = row["output_tok_s"] * 2 * facts["params"] / 1e9 / ceil[PEAK_KEY[server]]
    return {"bandwidth_share": bw, "compute_share": compute}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
