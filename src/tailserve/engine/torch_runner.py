"""The PyTorch model's runner (models/llama.py: the reference, and the path on GPU, in fp32, or without
a compiler): a scheduled batch as flat tensors and the AttentionMetadata built here; its KV pool as
torch tensors. The logits come back as numpy, as the fused runner's do (engine/model_runner.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from tailserve.engine import model_runner
from tailserve.engine.block_manager import BlockTable
from tailserve.engine.model_runner import RunResult, pool_shapes, sample_rows, sampled, sliding_blocks
from tailserve.engine.scheduler import ScheduledSeq
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.llama import LlamaModel


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on a CPU the bytes of engine/model_runner.py's `zeroed` (an anonymous map: why)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = model_runner.zeroed((math.prod(shape) * dtype.itemsize,), np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


class TorchRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, sliding_blocks: int = 0) -> None:
        """The KV pool in the model's own activation dtype, on its device."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.split = sliding_blocks > 0  # the sliding layers' KV in a pool of their own
        self.device = next(model.parameters()).device
        shapes = pool_shapes(model, num_blocks, block_size, sliding_blocks)
        dtype = model.embed.dtype
        self.kv_caches = [
            (zeroed(shape, dtype, self.device), zeroed(shape, dtype, self.device)) for shape in shapes
        ]

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """As ModelRunner.copy_blocks: every source read before any destination is written."""
        assert not self.split, "block copies in a split pool"
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for pool in itertools.chain.from_iterable(self.kv_caches):
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
        rows, firsts = sample_rows(order)
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

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> RunResult:
        ids, positions, meta, rows, firsts = self.prepare(batch)
        if self.device.type != "cpu":
            ids, positions = ids.to(self.device), positions.to(self.device)
            meta = meta.to(self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)]) if rows else hidden[:0]
        return RunResult(logits=logits.float().cpu().numpy(), sampled=sampled(batch), rows=firsts)
