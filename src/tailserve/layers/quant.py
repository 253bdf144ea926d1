"""Weight-only quantization (int8 per channel, int4 group-wise) and the block layout of the C++ linears.

int8: symmetric, one fp32 scale per output channel (w ≈ q·s, q in [-127, 127]).
int4: asymmetric per group of 32 input columns with fp16 scale and minimum (w ≈ q·d + m, q in [0, 15]):
this is GGUF Q4_1's format, so a Q4_1 model requantizes to exactly its own weights.
int8 per group: symmetric per group of 32 with an fp16 scale (w ≈ q·d): GGUF Q8_0's format, likewise.
"""

from __future__ import annotations

import torch

BLOCK = 32  # output channels per packed block (csrc/linear.h: kBlock)
INT4_GROUP = 32


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(
    w: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float → (q uint8 [N, K] in 0..15, scale fp16 [N, K/group], min fp16 [N, K/group])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).half()
    lo = lo.half()
    d = scale.float().clamp(min=1e-12)[..., None]  # what dequantization will multiply by
    q = torch.round((g - lo.float()[..., None]) / d).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def quantize_int8_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (q int8 [N, K] in -127..127, scale fp16 [N, K/group]); Q8_0 weights round-trip."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int8 groups need in_features ({k}) divisible by the group size {group}")
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(dim=-1) / 127).half()
    d = scale.float().clamp(min=1e-12)[..., None]
    q = torch.round(g / d).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scale


def dequantize_int8_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, scale.shape[1], -1).float() * scale.float()[..., None]).reshape(n, k)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = q.reshape(n, scale.shape[1], -1).float()
    return (g * scale.float()[..., None] + lo.float()[..., None]).reshape(n, k)


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % BLOCK
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """[N, K] → [N/32, K/2, 2, 16, 2]: per block of 32 channels and pair of k, two halves of 16 channels."""
    k = w.shape[1]
    w = pad_rows(w)
    return w.reshape(-1, 2, 16, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 → [N/32, K/2, 32] bytes: half 0 in the low nibble, half 1 in the high."""
    p = pack_pairs(q).flatten(3)  # [blocks, K/2, 2, 32]
    return p[:, :, 0] | (p[:, :, 1] << 4)


def pack_int4_scales(scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """fp16 [N, G] scale and min → [N/32, G, 2, 32]: a group's 32 scales, then its 32 minima."""
    s, m = pad_rows(scale), pad_rows(lo)
    blocks, groups = s.shape[0] // BLOCK, s.shape[1]
    return torch.stack([s, m], dim=1).reshape(blocks, BLOCK, 2, groups).permute(0, 3, 2, 1).contiguous()


def _quads(q: torch.Tensor) -> torch.Tensor:
    """[N, K] bytes → [N/32, K/4, 2, 16, 4]: per block and quad of k, two halves of 16 channels × 4 k."""
    k = q.shape[1]
    return pad_rows(q).reshape(-1, 2, 16, k // 4, 4).permute(0, 3, 1, 2, 4)


def pack_vnni_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 → [N/32, K/4, 64] bytes for vpdpbusd: half 0 low nibbles, half 1 high."""
    p = _quads(q)
    return (p[:, :, 0] | (p[:, :, 1] << 4)).flatten(2).contiguous()


def pack_vnni_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] → [N/32, K/4, 128] bytes q + 128 (unsigned, as vpdpbusd's first operand)."""
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return _quads(u).flatten(2).contiguous()
