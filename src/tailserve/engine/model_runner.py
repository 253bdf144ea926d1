"""Turns a scheduled batch into the fused step's arrays, runs it, and returns the logits of the rows to
sample (numpy fp32: what the sampler side takes from either model).

Owns the KV pool: one (K, V) pair per layer, shaped as the model says (`kv_cache_shape`). With
`sliding_blocks`, the sliding layers' pairs hold that many blocks, addressed by each sequence's
sliding table (engine/kv_pools.py), and the others `num_blocks`.
This runner serves the fused C++ step (models/fused.py) and needs no PyTorch; the PyTorch model
(models/llama.py) has its own (engine/torch_runner.py), chosen by `make_runner`.
"""

from __future__ import annotations

import itertools
import math
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tailserve.config import EngineConfig
from tailserve.engine.block_manager import BlockTable
from tailserve.engine.kv_pools import PoolPlan, plan_pools
from tailserve.engine.scheduler import ScheduledSeq
from tailserve.engine.sequence import Sequence
from tailserve.models.fused import KV_DTYPE, FusedLlama

if TYPE_CHECKING:  # the PyTorch side: imported only where it runs
    from tailserve.engine.torch_runner import TorchRunner
    from tailserve.models.llama import LlamaModel


@dataclass
class RunResult:
    logits: np.ndarray  # fp32 [rows, vocab]: each sampling sequence's last token, then one row per guess
    sampled: list[ScheduledSeq]  # the sequences whose every token is now computed, in row order
    rows: list[int]  # the first logits row of each of them


def kv_itemsize(model: FusedLlama | LlamaModel) -> int:
    """Bytes per KV element: the fused step's bf16, or the PyTorch model's activation dtype."""
    return np.dtype(KV_DTYPE).itemsize if isinstance(model, FusedLlama) else model.embed.dtype.itemsize


def kv_bytes_per_block(model: FusedLlama | LlamaModel, block_size: int) -> int:
    c = model.config
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * kv_itemsize(model)


def pools_for(model: FusedLlama | LlamaModel, config: EngineConfig, max_model_len: int) -> PoolPlan:
    """The engine's KV budget (`kv_cache_memory` GiB) as this model's pools (engine/kv_pools.py)."""
    c = model.config
    try:
        return plan_pools(
            [c.is_sliding(i) for i in range(c.num_layers)],
            c.sliding_window,
            int(config.kv_cache_memory * (1 << 30)),
            kv_bytes_per_block(model, config.block_size) // c.num_layers,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens if config.chunked_prefill else max_model_len,
        )
    except ValueError:
        raise ValueError(f"kv_cache_memory {config.kv_cache_memory} GiB holds fewer than 2 blocks") from None


def sliding_blocks(table: BlockTable) -> list[int]:
    """A sequence's sliding-pool block ids, its let-go blocks (HOLEs, never read) as block 0."""
    assert table.sliding is not None, "a split pool's sequence without a sliding table"
    return [max(b, 0) for b in table.sliding.blocks]


def padded(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one int64 [rows, longest] array, padded with block 0."""
    width = max(len(t) for t in tables)
    return np.array([t + [0] * (width - len(t)) for t in tables], np.int64)


def zeroed(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in an anonymous memory map: the kernel's zero pages, touched only as blocks are
    first written, where writing zeros would touch the whole pool at start (1.2 s for the default
    1 GiB, measured: BENCHMARKS.md, cold start). Page-aligned, as the kernels' vector loads like."""
    return np.frombuffer(mmap.mmap(-1, math.prod(shape) * np.dtype(dtype).itemsize), dtype).reshape(shape)


def sample_rows(batch: list[ScheduledSeq]) -> tuple[list[int], list[int]]:
    """Rows to sample: the last token of each sequence now fully computed, and each guess's row
    with the row before it. Also, per sampling sequence, where its rows start among them."""
    rows: list[int] = []
    firsts: list[int] = []
    end = 0
    for s in batch:
        end += s.num_new_tokens + len(s.draft)
        if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens:
            firsts.append(len(rows))
            rows.extend(range(end - 1 - len(s.draft), end))
    return rows, firsts


def sampled(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
    return [s for s in batch if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens]


def pool_shapes(
    model: FusedLlama | LlamaModel, num_blocks: int, block_size: int, sliding_blocks: int
) -> list[tuple[int, ...]]:
    """Each layer's K (or V) pool shape: the sliding layers' hold `sliding_blocks` when it is not 0."""
    c = model.config
    return [
        model.kv_cache_shape(sliding_blocks if sliding_blocks and c.is_sliding(i) else num_blocks, block_size)
        for i in range(c.num_layers)
    ]


def make_runner(
    model: FusedLlama | LlamaModel, num_blocks: int, block_size: int, sliding_blocks: int = 0
) -> ModelRunner | TorchRunner:
    """The runner of a model: this module's for the fused step, else the PyTorch one (imported only then)."""
    if isinstance(model, FusedLlama):
        return ModelRunner(model, num_blocks, block_size, sliding_blocks)
    from tailserve.engine.torch_runner import TorchRunner

    return TorchRunner(model, num_blocks, block_size, sliding_blocks)


class ModelRunner:
    """The fused step's runner: batches as per-sequence spans and block tables."""

    def __init__(self, model: FusedLlama, num_blocks: int, block_size: int, sliding_blocks: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.split = sliding_blocks > 0  # the sliding layers' KV in a pool of their own
        shapes = pool_shapes(model, num_blocks, block_size, sliding_blocks)
        self.kv_caches = [(zeroed(shape, KV_DTYPE), zeroed(shape, KV_DTYPE)) for shape in shapes]
        self._caches = model.caches([k for k, _ in self.kv_caches], [v for _, v in self.kv_caches])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block src into block dst, every layer, for each (src, dst). All sources are
        read before any destination is written (a source may be another pair's destination, as the
        scheduler found them). A pool holds a block's slots contiguously: viewed as [blocks, -1], it
        has a row per block. (Two pools take no partial hits: no copies.)"""
        assert not self.split, "block copies in a split pool"
        src = np.array([p[0] for p in pairs], np.int64)
        dst = np.array([p[1] for p in pairs], np.int64)
        for pool in itertools.chain.from_iterable(self.kv_caches):
            rows = pool.reshape(self.num_blocks, -1)
            rows[dst] = rows[src]

    def run(self, batch: list[ScheduledSeq]) -> RunResult:
        rows, firsts = sample_rows(batch)
        logits = self._fused(
            [s.seq for s in batch], [s.token_ids for s in batch], [s.seq.num_computed for s in batch], rows
        )
        return RunResult(logits=logits, sampled=sampled(batch), rows=firsts)

    def _fused(
        self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int], rows: list[int], depth=None
    ) -> np.ndarray:
        """The fused step over `tokens[i]` of `seqs[i]` at positions from `starts[i]`: logits of `rows`."""
        ids = [t for toks in tokens for t in toks]
        counts = [-(-(start + len(toks)) // self.block_size) for start, toks in zip(starts, tokens)]
        return self.model.step(
            np.array(ids, np.int64),
            np.array([(start, len(t)) for start, t in zip(starts, tokens)], np.int64).reshape(-1, 2),
            padded([seq.table.blocks[:n] for seq, n in zip(seqs, counts)]),
            self.block_size,
            np.array(rows, np.int64),
            self._caches,
            depth,
            padded([sliding_blocks(seq.table)[:n] for seq, n in zip(seqs, counts)]) if self.split else None,
        )

    def run_chunks(
        self, seqs: list[Sequence], chunks: list[list[int]], starts: list[int], depth: int | None = None
    ) -> np.ndarray:
        """A draft pass: `chunks[i]` of `seqs[i]` at positions from `starts[i]` (within its blocks),
        through the first `depth` layers (all when None); logits of each chunk's last token
        [len(seqs), vocab]. Writes those layers' KV there, which a full pass of the target later
        overwrites when this pool is the target's."""
        rows = list(itertools.accumulate(len(c) for c in chunks))
        return self._fused(seqs, chunks, starts, [r - 1 for r in rows], depth)
