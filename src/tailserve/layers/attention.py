"""Paged attention on a flat KV pool: ragged prefill chunks and batched decode over block tables.

The pool of one layer is `[num_slots, num_kv_heads, head_dim]`, num_slots = blocks × block_size; a
token's slot is `block_table[pos // block_size] * block_size + pos % block_size`. The batch is flat:
decode tokens first (one per sequence, attended together in one padded call), then prefill chunks
(each attended on its own, since their query lengths differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [B, L] context slots per decode sequence (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool, True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)


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
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (already written to the cache). Returns [T, H, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        # One query token per sequence: a KV head's `group` query heads play the role of the query
        # length, so grouped-query attention needs no repeat of K/V.
        qd = q[:nd].view(nd, num_kv, group, head_dim)
        kd = k_cache[meta.decode_slots].transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = od.reshape(nd, num_heads, head_dim)
    for p in meta.prefills:
        rows = slice(p.start, p.start + p.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
        if p.context_slots is None:
            kp, vp = k[rows], v[rows]
        else:
            kp, vp = k_cache[p.context_slots], v_cache[p.context_slots]
        kp = kp.transpose(0, 1).unsqueeze(0)
        vp = vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp,
            kp,
            vp,
            attn_mask=p.causal_mask,
            is_causal=p.causal_mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
