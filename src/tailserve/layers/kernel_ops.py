"""The C++ kernels' single ops (csrc/ops.cpp) on PyTorch tensors: the PyTorch model path's linears
and decode attention. The C interface takes pointers; here are the checks of dtype, layout and shape
that make them safe, and the output tensors. They run on PyTorch's intra-op thread count."""

from __future__ import annotations

import torch

from tailserve.layers import kernels
from tailserve.layers.kernels import TsLinear


def _c_linear(kind: int, w: torch.Tensor, s: torch.Tensor | None, n: int, k: int, group: int) -> TsLinear:
    """A packed weight's C view (kinds: csrc/linear.h); the tensors must outlive it."""
    assert w.is_contiguous() and (s is None or s.is_contiguous()), "packed weights are contiguous"
    if s is not None and kind == 1:
        assert s.dtype == torch.float32, "int8 scales: fp32"
    elif s is not None and kind >= 2:
        assert s.dtype == torch.float16, "group scales: fp16"
    return TsLinear(
        kind,
        w.data_ptr(),
        w.numel() * w.element_size(),
        None if s is None else s.data_ptr(),
        0 if s is None else s.numel(),
        n,
        k,
        group,
    )


def linear(
    kind: int, w: torch.Tensor, s: torch.Tensor | None, n: int, x: torch.Tensor, group: int
) -> torch.Tensor:
    """x [M, K] bf16 @ W.T for the packed W: [M, n] bf16."""
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or x.dim() != 2:
        raise RuntimeError("x must be contiguous bf16 [M, in_features]")
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    lin = _c_linear(kind, w, s, n, x.shape[1], group)
    kernels.ops().call("ts_linear", lin, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Paged attention of one query row per table row: q [N, H, D], caches [slots, Hkv, D]."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise RuntimeError("bad shapes")
    if not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise RuntimeError("need contiguous q/cache")
    if not q.dtype == k_cache.dtype == v_cache.dtype or q.dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError("q and caches must share a dtype, float32 or bfloat16")
    if table.dtype != torch.int64 or lens.dtype != torch.int64 or table.dim() != 2 or table.stride(1) != 1:
        raise RuntimeError("table/lens must be int64, the table's rows contiguous")
    n, h, d = q.shape
    if k_cache.shape[2] != d or h % k_cache.shape[1] or table.shape[0] != n or lens.shape != (n,):
        raise RuntimeError("shape mismatch")
    lens = lens.contiguous()
    out = torch.empty_like(q)
    kernels.ops().call(
        "ts_decode_attention",
        q.dtype == torch.bfloat16,
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        n,
        h,
        d,
        k_cache.shape[1],
        table.data_ptr(),
        table.stride(0),
        table.shape[1],
        block_size,
        lens.data_ptr(),
        scale,
        torch.get_num_threads(),
    )
    return out
