"""Accuracy of each precision against fp32 on a fixed text set: greedy-match rate over 64 generated
tokens and mean KL divergence of the next-token distributions.

    python benchmarks/quant_accuracy.py [--model NAME] [--tokens 64] [--json out.json]

Each precision runs on the PyTorch model (bf16 activations; int8 per channel, int4 per group) and on
the fused C++ step (int8 per group of 32 and int4 there take int8-quantized activations, as llama.cpp).

Greedy match: each precision generates `--tokens` tokens greedily through the engine (its decode path,
kernels included); the rate is the share of positions equal to fp32's continuation. KL: the fp32
continuation is fed to every precision (teacher forcing) and KL(fp32 ‖ precision) is averaged over
those positions, so one early divergence does not decide the whole score.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.fused import KV_DTYPE, FusedLlama
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config_and_weights, resolve_model
from tailserve.sampling import SamplingParams
from tailserve.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics state that",
    "To make a cup of tea, first",
    "In 1969, the Apollo 11 mission",
    "A hash table is a data structure that",
]
PRECISIONS = {  # name → (activation dtype, quantization, model)
    "fp32": (torch.float32, "none", "torch"),
    "bf16": (torch.bfloat16, "none", "torch"),
    "int8": (torch.bfloat16, "int8", "torch"),
    "int4": (torch.bfloat16, "int4", "torch"),
    "fused bf16": (torch.bfloat16, "none", "fused"),
    "fused int8": (torch.bfloat16, "int8", "fused"),
    "fused int4": (torch.bfloat16, "int4", "fused"),
}
BLOCK = 16


def generate(model: LlamaModel | FusedLlama, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model="bench", kv_cache_memory=0.05, max_num_seqs=len(prompts)), model)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@torch.inference_mode()
def log_probs(model: LlamaModel | FusedLlama, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities after every position of `ids`, one prefill chunk."""
    c, t = model.config, len(ids)
    if isinstance(model, FusedLlama):
        nblk = -(-t // BLOCK)
        kv = [np.zeros(model.kv_cache_shape(nblk, BLOCK), KV_DTYPE) for _ in range(2 * c.num_layers)]
        seqs, tables = np.array([[0, t]]), np.arange(nblk)[None]
        lg = model.compute_logits(np.array(ids), seqs, tables, BLOCK, np.arange(t), kv[::2], kv[1::2])
        return torch.from_numpy(lg).log_softmax(-1)
    pools = [
        (
            torch.zeros(t, c.num_kv_heads, c.head_dim, dtype=model.embed.dtype),
            torch.zeros(t, c.num_kv_heads, c.head_dim, dtype=model.embed.dtype),
        )
        for _ in range(c.num_layers)
    ]
    meta = AttentionMetadata(torch.arange(t), 0, prefills=[PrefillChunk(0, t, t, None, None)])
    return model.logits(model(torch.tensor(ids), torch.arange(t), pools, meta)).float().log_softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    path = resolve_model(args.model)
    config, weights = load_config_and_weights(path)
    tok = Tokenizer.load(path)
    prompts = [tok.encode(t) for t in TEXTS]
    results, ref_gen, ref_lp = {}, None, None
    for name, (dtype, quantization, impl) in PRECISIONS.items():
        if impl == "fused":
            model: LlamaModel | FusedLlama = FusedLlama.pack(config, weights, quantization)
        else:
            model = LlamaModel(config, weights, dtype, quantization).eval()
        gen = generate(model, prompts, args.tokens)
        ref_gen = ref_gen or gen
        lps = [log_probs(model, p + g)[len(p) - 1 : -1] for p, g in zip(prompts, ref_gen, strict=True)]
        ref_lp = ref_lp or lps
        match = sum(a == b for g, r in zip(gen, ref_gen, strict=True) for a, b in zip(g, r, strict=True))
        kl = torch.cat(
            [
                F.kl_div(lp, r, log_target=True, reduction="none").sum(-1)
                for lp, r in zip(lps, ref_lp, strict=True)
            ]
        )
        rate = match / (len(prompts) * args.tokens)
        results[name] = {"greedy_match": rate, "mean_kl": kl.mean().item()}
        print(f"{name:>10}: greedy-match {rate:6.1%}  mean KL {kl.mean().item():.5f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "results": results},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
