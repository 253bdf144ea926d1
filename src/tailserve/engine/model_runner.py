"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the rows to sample.

Owns the KV pool: one (K, V) pair per layer, shaped as the model says (`kv_cache_shape`).
Two models: the fused C++ step (models/fused.py) takes the batch as per-sequence spans and block
tables; the PyTorch model (models/llama.py) takes the AttentionMetadata built here.
"""

from __future__ import annotations

import itertools
import math
import mmap
from dataclasses import dataclass

import torch

from tailserve.engine.scheduler import ScheduledSeq
from tailserve.engine.sequence import Sequence
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.fused import FusedLlama
from tailserve.models.llama import LlamaModel


@dataclass
class RunResult:
    logits: torch.Tensor  # [rows, vocab]: each sampling sequence's last token, then one row per guess
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
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        shape = model.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [
            (zeroed(shape, dtype, device), zeroed(shape, dtype, device))
            for _ in range(model.config.num_layers)
        ]
        self._k_caches = [k for k, _ in self.kv_caches]
        self._v_caches = [v for _, v in self.kv_caches]

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block src into block dst, every layer, for each (src, dst). All sources are
        read before any destination is written (a source may be another pair's destination, as the
        scheduler found them). Both models' pools hold a block's slots contiguously: viewed as
        [blocks, -1], a pool has a row per block."""
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
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decode=len(singles))
        if singles:
            lens = torch.tensor([s.seq.num_computed + 1 for s in singles])
            nblk = -(-int(lens.max()) // self.block_size)
            tables = torch.zeros(len(singles), nblk, dtype=torch.long)
            for r, s in enumerate(singles):
                blocks = s.seq.table.blocks[:nblk]
                tables[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
                ids.append(s.seq.token_ids[s.seq.num_computed])
                positions.append(s.seq.num_computed)
            meta.block_size = self.block_size
            meta.decode_block_tables = tables
            meta.decode_context_lens = lens
            last = lens - 1
            slot_parts.append(
                tables[torch.arange(len(singles)), last // self.block_size] * self.block_size
                + last % self.block_size
            )
        for s in chunks:
            seq, tokens = s.seq, s.token_ids
            n = len(tokens)
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(tokens)
            positions.extend(range(start, end))
            new_slots = self._slots(seq.table.blocks, start, end)
            slot_parts.append(new_slots)
            chunk = PrefillChunk(
                start=len(ids) - n, length=n, context_len=end, context_slots=None, causal_mask=None
            )
            if start > 0:
                chunk.context_slots = self._slots(seq.table.blocks, 0, end)
                q_pos = torch.arange(start, end)
                chunk.causal_mask = torch.arange(end)[None, :] <= q_pos[:, None]
            meta.prefills.append(chunk)
        meta.slot_mapping = torch.cat(slot_parts)
        order = singles + chunks
        batch[:] = order
        rows, firsts = self._sample_rows(order)
        return torch.tensor(ids), torch.tensor(positions), meta, rows, firsts

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
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)]) if rows else hidden[:0]
        return RunResult(logits=logits.cpu(), sampled=self._sampled(batch), rows=firsts)

    @staticmethod
    def _sampled(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        return [s for s in batch if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens]

    def _run_fused(self, batch: list[ScheduledSeq]) -> RunResult:
        rows, firsts = self._sample_rows(batch)
        logits = self._fused(
            [s.seq for s in batch], [s.token_ids for s in batch], [s.seq.num_computed for s in batch], rows
        )
        return RunResult(logits=logits, sampled=self._sampled(batch), rows=firsts)

    def _fused(
        self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int], rows: list[int], depth=None
    ) -> torch.Tensor:
        """The fused step over `tokens[i]` of `seqs[i]` at positions from `starts[i]`: logits of `rows`."""
        ids: list[int] = []
        tables: list[list[int]] = []
        for seq, toks, start in zip(seqs, tokens, starts):
            ids.extend(toks)
            tables.append(seq.table.blocks[: -(-(start + len(toks)) // self.block_size)])
        width = max(len(t) for t in tables)
        return self.model.compute_logits(
            torch.tensor(ids),
            torch.tensor([(start, len(t)) for start, t in zip(starts, tokens)]),
            torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            self.block_size,
            torch.tensor(rows, dtype=torch.long),
            self._k_caches,
            self._v_caches,
            depth,
        )

    @torch.inference_mode()
    def run_chunks(
        self, seqs: list[Sequence], chunks: list[list[int]], starts: list[int], depth: int | None = None
    ) -> torch.Tensor:
        """A draft pass: `chunks[i]` of `seqs[i]` at positions from `starts[i]` (within its blocks),
        through the first `depth` layers (all when None); logits of each chunk's last token
        [len(seqs), vocab]. Writes those layers' KV there, which a full pass of the target later
        overwrites when this pool is the target's."""
        assert isinstance(self.model, FusedLlama), "draft passes run on the fused step"
        rows = list(itertools.accumulate(len(c) for c in chunks))
        return self._fused(seqs, chunks, starts, [r - 1 for r in rows], depth)
