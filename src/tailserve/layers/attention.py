"""Paged attention on a flat KV pool: ragged prefill chunks and batched decode over block tables.

The pool of one layer is `[num_slots, num_kv_heads, head_dim]`, num_slots = blocks × block_size; a
token's slot is `block_table[pos // block_size] * block_size + pos % block_size`. The batch is flat:
decode tokens first (one per sequence, attended together in one call), then prefill chunks (each
attended on its own, since their query lengths differ).

On CPU, decode attention runs the C++ kernel (layers/kernels.py), which reads every sequence's K/V
rows in place through its block table: no gather copy of each context per layer, no padding to the
longest one. Elsewhere, or when the kernel cannot be built, the padded gather + SDPA path runs.

A sliding-window layer (Gemma 3) attends to the last `window` positions only, its own included
(transformers: kv > q - window). Its decodes read just those slots (a per-step slot table, the
kernel's "block size 1" form); its prefill chunks read the context from the first position any of
their queries can see, under a banded mask. When the sliding layers' KV is in a pool of its own
(engine/kv_pools.py), `AttentionMetadata.sliding` describes the batch in that pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tailserve.layers import kernel_ops, kernels


@dataclass
class PrefillChunk:
    """One sequence's chunk of new tokens: rows [start, start+length) of the flat batch."""

    start: int
    length: int
    context_len: int  # tokens attended to after this chunk: cached + earlier chunks + this one
    context_slots: torch.Tensor | None  # [context_len] slots, or None when the chunk is the whole context
    causal_mask: torch.Tensor | None  # [length, context_len] bool, True = attend; None when no prior context


@dataclass
class AttentionMetadata:
    """Where the batch's tokens live in the pool. Decodes are described either by block tables and
    context lengths (preferred: what the kernel reads) or by padded slot matrices and masks; the
    missing form is derived once per step, on first use."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [B, L] context slots per decode sequence (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)
    block_size: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64 block ids (padding: any valid id)
    decode_context_lens: torch.Tensor | None = None  # [B] int64 tokens attended, the new one included
    # Per window size, derived once per step: decode (slots, lens) and each prefill's (first, mask).
    windows: dict[tuple, tuple] = field(default_factory=dict, repr=False)
    sliding: AttentionMetadata | None = None  # the same batch in the sliding layers' own pool, if any

    def to(self, device: torch.device) -> AttentionMetadata:
        """A copy with every tensor on `device` (non-blocking)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            num_decode=self.num_decode,
            decode_slots=mv(self.decode_slots),
            decode_mask=mv(self.decode_mask),
            prefills=[
                PrefillChunk(p.start, p.length, p.context_len, mv(p.context_slots), mv(p.causal_mask))
                for p in self.prefills
            ],
            block_size=self.block_size,
            decode_block_tables=mv(self.decode_block_tables),
            decode_context_lens=mv(self.decode_context_lens),
            sliding=None if self.sliding is None else self.sliding.to(device),
        )

    def decode_lookup(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(table, block_size, context_lens) for the kernel; a slot matrix is a table of block size 1."""
        if self.decode_context_lens is None:
            assert self.decode_mask is not None, "decode metadata needs context lengths or a mask"
            self.decode_context_lens = self.decode_mask.flatten(1).sum(1)
        if self.decode_block_tables is not None:
            return self.decode_block_tables, self.block_size, self.decode_context_lens
        assert self.decode_slots is not None, "decode metadata needs block tables or slots"
        return self.decode_slots, 1, self.decode_context_lens

    def window_decode(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, W], lens [B]) of each decode's last `window` positions (W = the most any has),
        left-aligned: row b's first lens[b] slots are its window; the rest repeat a valid slot."""
        if ("decode", window) not in self.windows:
            table, bs, lens = self.decode_lookup()
            first = (lens - window).clamp(min=0)
            width = int((lens - first).max())
            pos = torch.minimum(first[:, None] + torch.arange(width, device=lens.device), lens[:, None] - 1)
            slots = table.gather(1, pos // bs) * bs + pos % bs
            self.windows["decode", window] = (slots.contiguous(), lens - first)
        return self.windows["decode", window]

    def window_prefill(self, i: int, window: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
        """For prefill chunk i: the first context position its queries can see, and the mask over
        positions [first, context_len) (None when plain causal attention is the same)."""
        if ("prefill", i, window) not in self.windows:
            p = self.prefills[i]
            start = p.context_len - p.length
            first = max(0, start - window + 1)
            mask = None if p.causal_mask is None else p.causal_mask[:, first:]
            if p.context_len - first > window:  # the last query cannot see `first`: a band
                q = torch.arange(start, p.context_len, device=device)[:, None]
                kv = torch.arange(first, p.context_len, device=device)[None, :]
                mask = (kv <= q) & (kv > q - window)
            self.windows["prefill", i, window] = (first, mask)
        return self.windows["prefill", i, window]

    def padded_decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, L], mask [B, 1, 1, L]) for the SDPA path; derived from block tables if absent."""
        if self.decode_slots is None or self.decode_mask is None:
            tables, lens, bs = self.decode_block_tables, self.decode_context_lens, self.block_size
            assert tables is not None and lens is not None, "decode metadata needs block tables or slots"
            pos = torch.arange(int(lens.max()), device=tables.device)
            self.decode_slots = tables[:, pos // bs] * bs + pos % bs
            self.decode_mask = (pos[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)
        return self.decode_slots, self.decode_mask


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (already written to the cache). Returns [T, H, D].
    window: attend to the last `window` positions only (module docstring)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    out = torch.empty_like(q)
    nd = meta.num_decode
    ops = kernels.ops() if q.device.type == "cpu" else None
    if nd:
        if window is None:
            table, block_size, lens = meta.decode_lookup()
        else:
            (table, lens), block_size = meta.window_decode(window), 1
    if nd and ops is not None:
        od = kernel_ops.decode_attention(
            q[:nd].contiguous(), k_cache, v_cache, table, block_size, lens, scale
        )
        if nd == q.shape[0]:
            return od
        out[:nd] = od
    elif nd:
        # One query token per sequence: a KV head's `group` query heads play the role of the query
        # length, so grouped-query attention needs no repeat of K/V.
        if window is None:
            slots, mask = meta.padded_decode()
        else:
            slots = table
            mask = (torch.arange(slots.shape[1], device=lens.device)[None, :] < lens[:, None]).view(
                nd, 1, 1, -1
            )
        qd = q[:nd].view(nd, num_kv, group, head_dim)
        kd = k_cache[slots].transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache[slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim)
    for i, p in enumerate(meta.prefills):
        rows = slice(p.start, p.start + p.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
        first, mask = (0, p.causal_mask) if window is None else meta.window_prefill(i, window, q.device)
        if p.context_slots is None:
            kp, vp = k[rows], v[rows]
        else:
            kp, vp = k_cache[p.context_slots[first:]], v_cache[p.context_slots[first:]]
        kp = kp.transpose(0, 1).unsqueeze(0)
        vp = vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=group > 1
        )
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
