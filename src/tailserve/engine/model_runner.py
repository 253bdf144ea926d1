"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the rows to sample.

Owns the KV pool: one (K, V) pair per layer, shaped as the model says (`kv_cache_shape`).
Two models: the fused C++ step (models/fused.py) takes the batch as per-sequence spans and block
tables; the PyTorch model (models/llama.py) takes the AttentionMetadata built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailserve.engine.scheduler import ScheduledSeq
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.fused import FusedLlama
from tailserve.models.llama import LlamaModel


@dataclass
class RunResult:
    logits: torch.Tensor  # [N, vocab] for the sequences whose every token is now computed
    sampled: list[ScheduledSeq]  # those sequences, in row order


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
        self.device = torch.device(device)
        shape = model.kv_cache_shape(num_blocks, block_size)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model.config.num_layers)
        ]
        self._k_caches = [k for k, _ in self.kv_caches]
        self._v_caches = [v for _, v in self.kv_caches]

    def _slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, attention metadata and the rows whose logits are needed.

        Single-token work (decodes, and one-token chunks) goes first and is attended in one call.
        """
        singles = [s for s in batch if s.num_new_tokens == 1]
        chunks = [s for s in batch if s.num_new_tokens > 1]
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
            seq, n = s.seq, s.num_new_tokens
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
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
        # Rows to sample: the last token of each sequence that is now fully computed.
        order = singles + chunks
        rows, row = [], -1
        for s in order:
            row += s.num_new_tokens
            if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens:
                rows.append(row)
        batch[:] = order
        return torch.tensor(ids), torch.tensor(positions), meta, rows

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> RunResult:
        if isinstance(self.model, FusedLlama):
            return self._run_fused(batch)
        ids, positions, meta, rows = self.prepare(batch)
        if self.device.type != "cpu":
            ids, positions = ids.to(self.device), positions.to(self.device)
            meta = meta.to(self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        sampled = [s for s in batch if s.seq.num_computed + s.num_new_tokens == s.seq.num_tokens]
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)]) if rows else hidden[:0]
        return RunResult(logits=logits.cpu(), sampled=sampled)

    def _run_fused(self, batch: list[ScheduledSeq]) -> RunResult:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        tables: list[list[int]] = []
        rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        for s in batch:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed
            ids.extend(seq.token_ids[start : start + n])
            spans.append((start, n))
            tables.append(seq.table.blocks[: -(-(start + n) // self.block_size)])
            if start + n == seq.num_tokens:
                rows.append(len(ids) - 1)
                sampled.append(s)
        width = max(len(t) for t in tables)
        logits = self.model.compute_logits(
            torch.tensor(ids),
            torch.tensor(spans),
            torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            self.block_size,
            torch.tensor(rows, dtype=torch.long),
            self._k_caches,
            self._v_caches,
        )
        return RunResult(logits=logits, sampled=sampled)
