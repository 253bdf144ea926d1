"""Decode-step benchmark of the model's hot path: step time, tok/s and achieved bandwidth (GB/s of
weights + KV actually read) per precision and batch size, three implementations side by side.

    python benchmarks/kernels.py [--model NAME] [--batches 1,8,16,32] [--context 480] [--json out.json]

Variants are built once and timed round-robin in one process, so machine noise hits them alike;
each cell is the median over repeats. `torch` = PyTorch ops (gather + SDPA attention; F.linear,
`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), `kernel` = the same PyTorch model with the
C++ attention and linear ops, `fused` = the whole step in one C++ call (models/fused.py; int8/int4
there on vpdpbusd with int8 activations). Every sequence has its own context (no shared prefix: the
KV bytes are all distinct), `--shared` gives them a common prefix of that many tokens instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch

from tailserve.layers import kernels, linear
from tailserve.layers.attention import AttentionMetadata
from tailserve.models.fused import FusedLlama
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config_and_weights, resolve_model

BLOCK = 16


@contextlib.contextmanager
def pytorch_ops() -> Iterator[None]:
    """Build and run with PyTorch's ops only: the baseline."""
    with (
        mock.patch.object(kernels, "ops", return_value=None),
        mock.patch.object(linear, "default_backend", return_value="torch"),
    ):
        yield


def weight_bytes(model: LlamaModel | FusedLlama) -> int:
    """Bytes one step reads from the linears (the embedding lookup reads only B rows)."""
    return sum(
        b.nbytes for m in model.modules() if isinstance(m, linear.Linear) for b in m.state_dict().values()
    )


def decode_inputs(
    model: LlamaModel | FusedLlama, batch: int, context: int, dtype: torch.dtype, seed: int = 0
):
    """Random K/V pools and the metadata of one decode step of `batch` sequences of ~`context` tokens."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(context - context // 8, context + context // 8 + 1, (batch,), generator=g)
    nblk = -(-int(lens.max()) // BLOCK)
    num_blocks = batch * nblk
    tables = torch.randperm(num_blocks, generator=g).view(batch, nblk)
    shape = (num_blocks * BLOCK, c.num_kv_heads, c.head_dim)
    pools = [
        (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
        for _ in model.layers
    ]
    pos = lens - 1
    slot_mapping = tables[torch.arange(batch), pos // BLOCK] * BLOCK + pos % BLOCK
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decode=batch,
        block_size=BLOCK,
        decode_block_tables=tables,
        decode_context_lens=lens,
    )
    ids = torch.randint(0, c.vocab_size, (batch,), generator=g)
    kv_bytes = int(lens.sum()) * c.num_layers * 2 * c.num_kv_heads * c.head_dim * pools[0][0].element_size()
    return ids, pos, pools, meta, kv_bytes


@torch.inference_mode()
def step(model: LlamaModel, ids: torch.Tensor, pos: torch.Tensor, pools, meta: AttentionMetadata) -> None:
    """One decode step; a fresh copy of the metadata, so what the attention derives is timed each step."""
    model.logits(model(ids, pos, pools, AttentionMetadata(**vars(meta))))


def fused_inputs(model: FusedLlama, ids: torch.Tensor, meta: AttentionMetadata, shared: int):
    """The same step for the fused model: its pair-layout pools, spans and block tables."""
    c = model.config
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    assert tables is not None and lens is not None
    tables = tables.clone()
    if shared:
        tables[:, : shared // BLOCK] = tables[0, : shared // BLOCK].clone()
    shape = model.kv_cache_shape(int(tables.max()) + 1, BLOCK)
    g = torch.Generator().manual_seed(1)
    k = [torch.randn(shape, generator=g).bfloat16() for _ in range(c.num_layers)]
    v = [torch.randn(shape, generator=g).bfloat16() for _ in range(c.num_layers)]
    spans = torch.stack([lens - 1, torch.ones_like(lens)], 1)
    return ids, spans, tables, BLOCK, torch.arange(len(ids)), k, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,8,16,32")
    ap.add_argument("--context", type=int, default=480)
    ap.add_argument("--precisions", default="none,int8,int4")
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shared", type=int, default=0, help="tokens of context all sequences share")
    ap.add_argument("--impls", default="torch,kernel,fused")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    dtype = torch.bfloat16
    config, weights = load_config_and_weights(resolve_model(args.model))
    kernels.ops()  # build (or load) once, outside the timings
    impls = args.impls.split(",")
    variants: dict[tuple[str, str], LlamaModel | FusedLlama] = {}
    for prec in args.precisions.split(","):
        if "torch" in impls:
            with pytorch_ops():
                variants[prec, "torch"] = LlamaModel(config, weights, dtype, prec).eval()
        if "kernel" in impls:
            variants[prec, "kernel"] = LlamaModel(config, weights, dtype, prec).eval()
        if "fused" in impls:
            variants[prec, "fused"] = FusedLlama.pack(config, weights, prec)
    del weights
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        any_model = next(iter(variants.values()))
        ids, pos, pools, meta, kv_bytes = decode_inputs(any_model, batch, args.context, dtype)
        fused_args = fused_inputs(
            variants[next(k for k in variants if k[1] == "fused")], ids, meta, args.shared
        )
        times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for (prec, impl), model in variants.items():
                if isinstance(model, FusedLlama):
                    run = functools.partial(model.compute_logits, *fused_args)
                else:
                    run = functools.partial(step, model, ids, pos, pools, meta)
                ctx = pytorch_ops() if impl == "torch" else contextlib.nullcontext()
                with ctx:
                    run()  # warm
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        run()
                    times[prec, impl].append((time.perf_counter() - t0) / args.steps)
        for (prec, impl), ts in times.items():
            t = statistics.median(ts)
            kv = (
                kv_bytes
                if not args.shared or impl != "fused"
                else kv_bytes * (1 - args.shared / args.context)
            )
            moved = weight_bytes(variants[prec, impl]) + kv
            rows.append(
                {
                    "precision": prec,
                    "impl": impl,
                    "batch": batch,
                    "step_ms": t * 1e3,
                    "tok_s": batch / t,
                    "gb_s": moved / t / 1e9,
                    "weight_mb": weight_bytes(variants[prec, impl]) / 1e6,
                    "kv_mb": kv_bytes / 1e6,
                }
            )
            r = rows[-1]
            print(
                f"batch {batch:>2}  {prec:>4}  {impl:>6}: step {r['step_ms']:7.2f} ms  "
                f"{r['tok_s']:7.1f} tok/s  "
                f"{r['gb_s']:5.1f} GB/s  (weights {r['weight_mb']:.0f} MB, KV {r['kv_mb']:.0f} MB)",
                flush=True,
            )
    if args.json:
        meta_info = {
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "context": args.context,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta_info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
