"""KV memory a Gemma 3 sequence keeps with the sliding layers in a pool of their own (engine/kv_pools.py)
against one pool for every layer, measured on the engine as it serves (not timed).

For each context length, one request of that many (random) prompt tokens is prefilled and decoded a
few tokens on the engine; after its prompt's last step, the blocks its tables hold in each pool are
read off the live block managers, and the most it held in the sliding pool while a step ran (a
prefill chunk's blocks are held while the chunk runs, and let go after it). One pool for every
layer held ⌈context / block⌉ blocks in every layer (a block id named the same slot in every layer's
pool, and the full layers needed them all): that is the "one pool" column. Also: the context one
sequence can reach in the default KV budget, with one pool and with two.

    .venv/bin/python benchmarks/sliding_memory.py [--model gemma3-270m] [--contexts 512,2048,8192,32000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from harness import RECORDED, commit

from tailserve.engine.kv_pools import HybridBlockManager
from tailserve.engine.model_runner import kv_bytes_per_block
from tailserve.llm import LLM
from tailserve.sampling import SamplingParams

MiB = 1 << 20


def measure(llm: LLM, context: int, seed: int) -> dict:
    """Blocks one sequence holds in each pool once `context` tokens are computed, and its peak."""
    eng = llm.engine
    bm = eng.block_manager
    assert isinstance(bm, HybridBlockManager), "the model does not mix sliding and full layers"
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1000, eng.model.config.vocab_size - 1000, (context,), generator=g).tolist()
    rid = f"ctx-{context}"
    seq = eng.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    peak, held = 0, None
    run = eng.runner.run

    def running(batch):  # the step's tables as it runs, before it lets blocks go
        nonlocal peak
        s = seq.table.sliding
        peak = max(peak, len(s.blocks) - s.dropped)
        return run(batch)

    eng.runner.run = running
    try:
        while not seq.finished:
            eng.step()
            if held is None and seq.num_computed >= context:
                s = seq.table.sliding
                held = (len(seq.table.blocks), len(s.blocks) - s.dropped)
    finally:
        del eng.runner.run
    assert held is not None
    return {"full_blocks": held[0], "sliding_blocks": held[1], "sliding_peak_blocks": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--contexts", default="512,2048,8192,32000")
    ap.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (the prefill chunk)")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    llm = LLM(args.model, max_num_batched_tokens=args.chunk, prefix_cache=False)
    eng = llm.engine
    c, bs = eng.model.config, eng.config.block_size
    layer = kv_bytes_per_block(eng.model, bs) // c.num_layers  # one layer's K and V, one block
    n_slide = sum(c.is_sliding(i) for i in range(c.num_layers))
    n_full = c.num_layers - n_slide
    bm = eng.block_manager
    budget = int(eng.config.kv_cache_memory * (1 << 30))
    capacity = {
        "budget_gib": eng.config.kv_cache_memory,
        "one_pool_tokens": budget // (c.num_layers * layer) * bs,
        "full_pool_tokens": bm.full.num_blocks * bs,
        "sliding_pool_blocks": bm.sliding.num_blocks,
        "max_num_seqs": eng.config.max_num_seqs,
    }
    print(
        f"{args.model}: {c.num_layers} layers ({n_slide} sliding over {c.sliding_window}), block {bs}, "
        f"{layer // 1024} KiB per layer-block; {eng.config.kv_cache_memory} GiB holds "
        f"{capacity['one_pool_tokens']} tokens of context with one pool, "
        f"{capacity['full_pool_tokens']} with two "
        f"(sliding pool: {bm.sliding.num_blocks} blocks: {eng.config.max_num_seqs} windows and a chunk)"
    )
    print("| context | one pool | two pools: full + sliding blocks | kept | ratio | sliding peak (prefill) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for i, n in enumerate(contexts):
        m = measure(llm, n, i)
        before = -(-n // bs) * c.num_layers * layer
        after = (m["full_blocks"] * n_full + m["sliding_blocks"] * n_slide) * layer
        rows[n] = {**m, "one_pool_bytes": before, "two_pool_bytes": after}
        print(
            f"| {n:,} | {before / MiB:.1f} MiB | {m['full_blocks']} + {m['sliding_blocks']} | "
            f"{after / MiB:.1f} MiB | {before / after:.1f}× | {m['sliding_peak_blocks']} blocks |",
            flush=True,
        )
        assert m["full_blocks"] == -(-n // bs)
        assert (
            bm.full.num_free_blocks == bm.full.num_blocks
            and bm.sliding.num_free_blocks == bm.sliding.num_blocks
        )
    out = RECORDED / "sliding_memory.json"
    recorded = json.loads(out.read_text()) if out.exists() else {}
    recorded[f"{commit()}, {args.model}, chunk {args.chunk}"] = {
        "date": time.strftime("%Y-%m-%d"),
        "capacity": capacity,
        "contexts": rows,
    }
    out.write_text(json.dumps(recorded, indent=2))


if __name__ == "__main__":
    main()
