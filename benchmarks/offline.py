"""Offline throughput: tailserve's engine vs Hugging Face transformers' `generate`, same run, same prompts.

32 chat requests of the seeded `chat` workload (a shared ~400-token system prompt plus a user turn),
64 output tokens each, greedy, the same dtype for both. Also single-stream prefill and decode rates.

    .venv/bin/python benchmarks/offline.py [--model NAME_OR_PATH] [--requests 32] [--output-tokens 64]
        [--dtype bfloat16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from tailserve.bench.workloads import WorkloadParams, build_workload
from tailserve.config import DEFAULT_MODEL
from tailserve.llm import LLM
from tailserve.models.loader import resolve_model
from tailserve.sampling import SamplingParams


def chat_prompts(llm: LLM, n: int, seed: int) -> list[list[int]]:
    wl = build_workload("chat", n, seed, WorkloadParams(output_tokens=64))
    out = []
    for s in wl.sessions:
        msgs = [{"role": "system", "content": s.system}, {"role": "user", "content": s.turns[0].user}]
        out.append(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs)))
    return out


def bench_tailserve(llm: LLM, prompts: list[list[int]], new: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    assert all(len(o.token_ids) == new for o in outs)
    # Per-request latency from the engine's own time stamps.
    lat = [o.times.e2e for o in outs]  # type: ignore[union-attr]
    single = single_stream_tailserve(llm, prompts[0], new)
    return {
        "wall_s": wall,
        "output_tok_s": len(prompts) * new / wall,
        "mean_latency_s": sum(lat) / len(lat),
        **single,
    }


def single_stream_tailserve(llm: LLM, prompt: list[int], new: int) -> dict[str, float]:
    llm.engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    first = None
    n = 0
    for out in llm.stream(prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)):
        if out.new_token_ids and first is None:
            first = time.perf_counter()
        n += len(out.new_token_ids)
    end = time.perf_counter()
    assert first is not None
    return {"prefill_tok_s": len(prompt) / (first - t0), "decode_tok_s": (n - 1) / (end - first)}


def bench_transformers(
    path: Path, prompts: list[list[int]], new: int, dtype: torch.dtype
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "min_new_tokens": new}
    with torch.inference_mode():
        warm = kw | {"min_new_tokens": 4}
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, **warm)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, **kw)
        wall = time.perf_counter() - t0
        one = torch.tensor([prompts[0]])
        t0 = time.perf_counter()
        model.generate(one, max_new_tokens=1, **kw | {"min_new_tokens": 1})
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(one, max_new_tokens=new, **kw)
        full = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "output_tok_s": len(prompts) * new / wall,
        "mean_latency_s": wall,  # a static batch: every request ends with the batch
        "prefill_tok_s": len(prompts[0]) / prefill,
        "decode_tok_s": (new - 1) / max(full - prefill, 1e-9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a model name (e.g. gemma3-270m) or GGUF path")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quantization", default="auto", help="tailserve's weights (auto: int4 for the Q4_1 GGUF)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.requests, quantization=args.quantization)
    prompts = chat_prompts(llm, args.requests, args.seed)
    ours = bench_tailserve(llm, prompts, args.output_tokens)
    del llm
    torch.set_num_threads(threads)  # the fused engine sets PyTorch's own threads to 1 beside its team
    theirs = bench_transformers(resolve_model(args.model), prompts, args.output_tokens, dtype)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "offline",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": args.model,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "requests": args.requests,
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "output_tokens": args.output_tokens,
        "tailserve": ours,
        "transformers": theirs,
    }
    print("| metric | tailserve | transformers | ratio |\n|---|---|---|---|")
    for key, better in [
        ("output_tok_s", "higher"),
        ("mean_latency_s", "lower"),
        ("prefill_tok_s", "higher"),
        ("decode_tok_s", "higher"),
    ]:
        a, b = ours[key], theirs[key]
        print(f"| {key} ({better} is better) | {a:.3g} | {b:.3g} | {a / b:.2f}x |")
    print(f"\ncommit {commit}, {result['machine']}, mean prompt {result['mean_prompt_tokens']:.0f} tokens")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
