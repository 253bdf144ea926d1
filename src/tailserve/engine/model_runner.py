"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the rows to sample.

Owns the KV pool: one (K, V) pair per layer, shaped as the model says (`kv_cache_shape`). With
`sliding_blocks`, the sliding layers' pairs hold that many blocks, addressed by each sequence's
sliding table (engine/kv_pools.py), and the others `num_blocks`.
Two models: the fused C++ step (models/fused.py) takes the batch as per-sequence spans and block
tables; the PyTorch model (models/llama.py) takes the AttentionMetadata built here.
"""

from __future__ import annotations

import itertools
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tailserve.config import EngineConfig
from tailserve.engine.block_manager import BlockTable
from tailserve.engine.kv_pools import PoolPlan, plan_pools
from tailserve.engine.scheduler import ScheduledSeq
from tailserve.engine.sequence import Sequence
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.fused import FusedLlama
from tailserve.models.llama import LlamaModel


@dataclass
class RunResult:
    # [rows, vocab] float32: each sampling sequence's last token, then one row per guess. A numpy array:
    # the sampler side (sampler, masks, spec_decode) works on numpy, without torch.
    logits: np.ndarray
    sampled: list[ScheduledSeq]  # the sequences whose every token is now computed, in row order
    rows: list[int]  # the first logits row of each of them


def kv_bytes_per_block(model: LlamaModel | FusedLlama, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return (
        2
        * c.num_layers
        * block_size
        * c.num_kv_heads
        * c.head_dim
        * torch.tensor([], dtype=dtype).element_size()
    )


def pools_for(
    model: LlamaModel | FusedLlama, config: EngineConfig, dtype: torch.dtype, max_model_len: int
) -> PoolPlan:
    """The engine's KV budget (`kv_cache_memory` GiB) as this model's pools (engine/kv_pools.py)."""
    c = model.config
    try:
        return plan_pools(
            [c.is_sliding(i) for i in range(c.num_layers)],
            c.sliding_window,
            int(config.kv_cache_memory * (1 << 30)),
            kv_bytes_per_block(model, config.block_size, dtype) // c.num_layers,
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


def padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [rows, longest] tensor, padded with block 0."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables])


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A zero tensor. On a CPU it lives in an anonymous memory map: the kernel's zero pages, touched
    only as blocks are first written, where torch.zeros writes the whole pool at start (1.2 s for the
    default 1 GiB, measured: BENCHMARKS.md, cold start). Page-aligned, as the kernels' vector loads like."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * dtype.itemsize), dtype=dtype).view(shape)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel | FusedLlama,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
        sliding_blocks: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.split = sliding_blocks > 0  # the sliding layers' KV in a pool of their own
        self.device = torch.device(device)
        c = model.config
        shapes = [
            model.kv_cache_shape(sliding_blocks if self.split and c.is_sliding(i) else num_blocks, block_size)
            for i in range(c.num_layers)
        ]
        self.kv_caches = [(zeroed(shape, dtype, device), zeroed(shape, dtype, device)) for shape in shapes]
        self._k_caches = [k for k, _ in self.kv_caches]
        self._v_caches = [v for _, v in self.kv_caches]

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block src into block dst, every layer, for each (src, dst). All sources are
        read before any destination is written (a source may be another pair's destination, as the
        scheduler found them). Both models' pools hold a block's slots contiguously: viewed as
        [blocks, -1], a pool has a row per block. (Two pools take no partial hits: no copies.)"""
        assert not self.split, "block copies in a split pool"
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for pool in itertools.chain(self._k_caches, self._v_caches):
            rows = pool.view(self.num_blocks, -1)
            rows[dst] = rows[src]

    def _slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """Flat input ids, positions, attention metadata, the rows whose logits are needed, and for
        each sequence that samples, the first of its rows.

        Single-token work (decodes, and one-token chunks) goes first and is attended in one call;
        a decode with guesses is a chunk (its guesses attend to it causally).
        """
        singles = [s for s in batch if s.num_new_tokens + len(s.draft) == 1]
        chunks = [s for s in batch if s.num_new_tokens + len(s.draft) > 1]
        ids = [s.seq.token_ids[s.seq.num_computed] for s in singles]
        positions = [s.seq.num_computed for s in singles]
        for s in chunks:
            ids.extend(s.token_ids)
            positions.extend(range(s.seq.num_computed, s.seq.num_computed + len(s.token_ids)))
        meta = self._metadata(singles, chunks, lambda t: t.blocks)
        if self.split:
            meta.sliding = self._metadata(singles, chunks, sliding_blocks)
        order = singles + chunks
        batch[:] = order
        rows, firsts = self._sample_rows(order)
        return torch.tensor(ids), torch.tensor(positions), meta, rows, firsts

    def _metadata(
        self,
        singles: list[ScheduledSeq],
        chunks: list[ScheduledSeq],
        blocks_of: Callable[[BlockTable], list[int]],
    ) -> AttentionMetadata:
        """Where the batch's K/V is written and read in the pool whose block ids `blocks_of` gives."""
        slot_parts: list[torch.Tensor] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(singles))
        if singles:
            lens = torch.tensor([s.seq.num_computed + 1 for s in singles])
            nblk = -(-int(lens.max()) // self.block_size)
            tables = torch.zeros(len(singles), nblk, dtype=torch.long)
            for r, s in enumerate(singles):
                blocks = blocks_of(s.seq.table)[:nblk]
                tables[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            meta.block_size = self.block_size
            meta.decode_block_tables = tables
            meta.decode_context_lens = lens
            last = lens - 1
            slot_parts.append(
                tables[torch.arange(len(singles)), last // self.block_size] * self.block_size
                + last % self.block_size
            )
        row = len(singles)
        for s in chunks:
            seq, n = s.seq, len(s.token_ids)
            start, end = seq.num_computed, seq.num_computed + n
            blocks = blocks_of(seq.table)
            slot_parts.append(self._slots(blocks, start, end))
            chunk = PrefillChunk(start=row, length=n, context_len=end, context_slots=None, causal_mask=None)
            if start > 0:
                chunk.context_slots = self._slots(blocks, 0, end)
                q_pos = torch.arange(start, end)
                chunk.causal_mask = torch.arange(end)[None, :] <= q_pos[:, None]
            meta.prefills.append(chunk)
            row += n
        meta.slot_mapping = torch.cat(slot_parts)
        return meta

    @staticmethod
    def _sample_rows(batch: list[ScheduledSeq]) -> tuple[list[int], list[int]]:
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

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> RunResult:
        if isinstance(self.model, FusedLlama):
            return self._run_fused(batch)
        ids, positions, meta, rows, firsts = self.prepare(batch)
        if self.device.type != "cpu":
            ids, positions = ids.to(self.device), positions.to(self.device)
            meta = meta.to(self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        logits = (
            self.model.logits(hidden[torch.tensor(rows, device=self.device)]) if rows else hidden[:0].float()
        )
        return RunResult(logits=logits.cpu().numpy(), sampled=self._sampled(batch), rows=firsts)

    @staticmethod
    def _sampled(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        return [s for s in batch if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens]

    def _run_fused(self, batch: list[ScheduledSeq]) -> RunResult:
        rows, firsts = self._sample_rows(batch)
        logits = self._fused(
            [s.seq for s in batch], [s.token_ids for s in batch], [s.seq.num_computed for s in batch], rows
        )
        return RunResult(logits=logits.numpy(), sampled=self._sampled(batch), rows=firsts)

    def _fused(
        self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int], rows: list[int], depth=None
    ) -> torch.Tensor:
        """The fused step over `tokens[i]` of `seqs[i]` at positions from `starts[i]`: logits of `rows`."""
        ids = [t for toks in tokens for t in toks]
        counts = [-(-(start + len(toks)) // self.block_size) for start, toks in zip(starts, tokens)]
        return self.model.compute_logits(
            torch.tensor(ids),
            torch.tensor([(start, len(t)) for start, t in zip(starts, tokens)]),
            padded([seq.table.blocks[:n] for seq, n in zip(seqs, counts)]),
            self.block_size,
            torch.tensor(rows, dtype=torch.long),
            self._k_caches,
            self._v_caches,
            depth,
            padded([sliding_blocks(seq.table)[:n] for seq, n in zip(seqs, counts)]) if self.split else None,
        )

    @torch.inference_mode()
    def run_chunks(
        self, seqs: list[Sequence], chunks: list[list[int]], starts: list[int], depth: int | None = None
    ) -> np.ndarray:
        """A draft pass: `chunks[i]` of `seqs[i]` at positions from `starts[i]` (within its blocks),
        through the first `depth` layers (all when None); logits of each chunk's last token
        [len(seqs), vocab]. Writes those layers' KV there, which a full pass of the target later
        overwrites when this pool is the target's."""
        assert isinstance(self.model, FusedLlama), "draft passes run on the fused step"
        rows = list(itertools.accumulate(len(c) for c in chunks))
        return self._fused(seqs, chunks, starts, [r - 1 for r in rows], depth).numpy()  # numpy: as `run`
