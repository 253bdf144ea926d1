"""Linear layers behind one interface, `y = layer(x)` with x of shape [..., in_features]: dense, and
weight-only int8 (per channel, or per group of 32) and int4 (group-wise). `make_linear` picks the layer
for a precision.

Each layer runs on one of these backends, chosen once from the weight's device:
  vnni    grouped int4/int8 on the C++ vpdpbusd kernels, the input quantized to int8 per row and
          group of 32 (GGUF's Q8 scheme): twice vdpbf16ps' multiply rate, for the fused step;
  kernel  the C++ kernels on bf16 pairs (block-packed weights, bf16 activations): CPU, every tier;
  torch   PyTorch's packed CPU ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`);
  plain   dequantize-and-matmul, correct on any device.
Dense float32 layers always use `F.linear` (MKL's fp32 GEMV already runs near bandwidth).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from tailserve.layers import kernel_ops, kernels, quant

QUANTIZATIONS = ("none", "int8", "int4")
BF16, INT8, INT4, VNNI_INT4, VNNI_INT8 = 0, 1, 2, 3, 4  # the packed kinds (csrc/linear.h: kBf16 … kU8)


def default_backend(weight: torch.Tensor) -> str:
    if weight.device.type != "cpu":
        return "plain"
    mod = kernels.ops()
    return "kernel" if mod is not None else "torch"


class Linear(nn.Module, ABC):
    """The shared interface: a bias-free `[out_features, in_features]` map on the last dim of x."""

    def __init__(self, out_features: int, in_features: int, backend: str) -> None:
        super().__init__()
        self.out_features, self.in_features, self.backend = out_features, in_features, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    @abstractmethod
    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in_features] → [M, out_features]."""

    def kernel_weight(self) -> tuple[int, torch.Tensor, torch.Tensor | None, int]:
        """(kind, packed buffer, scales, group) as the C++ linears take them (csrc/linear.h), on the
        kernel and vnni backends: this layer's own calls and the fused step's packing read them."""
        raise TypeError(f"{type(self).__name__} on the {self.backend} backend has no C++ packed weight")

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        kind, w, s, group = self.kernel_weight()
        y = kernel_ops.linear(kind, w, s, self.out_features, x.to(torch.bfloat16).contiguous(), group)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, backend={self.backend}"


class DenseLinear(Linear):
    """An unquantized weight; bf16 on a kernel-capable CPU is block-packed for the C++ GEMV."""

    def __init__(self, weight: torch.Tensor, backend: str | None = None) -> None:
        backend = backend or default_backend(weight)
        if weight.dtype != torch.bfloat16 and backend == "kernel":
            backend = "torch"
        super().__init__(weight.shape[0], weight.shape[1], backend)
        if backend == "kernel":
            self.register_buffer("packed", quant.pack_pairs(weight))
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)

    def kernel_weight(self) -> tuple[int, torch.Tensor, torch.Tensor | None, int]:
        return (BF16, self.packed, None, 0) if self.backend == "kernel" else super().kernel_weight()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel_mm(x) if self.backend == "kernel" else F.linear(x, self.weight)


class Int8Linear(Linear):
    """Per-channel symmetric int8 weights: a quarter of fp32's bytes, a fraction of a percent of error."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, backend: str | None = None) -> None:
        """Quantizes `weight` as given (pass the source weights, not a bf16 rounding of them)."""
        backend = backend or default_backend(weight)
        super().__init__(weight.shape[0], weight.shape[1], backend)
        q, scale = quant.quantize_int8(weight)
        if backend == "kernel":
            self.register_buffer("packed", quant.pack_pairs(q))
            self.register_buffer("scale", quant.pad_rows(scale))
        else:
            self.register_buffer("q", q)
            self.register_buffer("scale", scale.to(dtype))

    def kernel_weight(self) -> tuple[int, torch.Tensor, torch.Tensor | None, int]:
        return (INT8, self.packed, self.scale, 0) if self.backend == "kernel" else super().kernel_weight()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "kernel":
            return self._kernel_mm(x)
        if self.backend == "torch":
            return torch._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
        return F.linear(x, self.q.to(x.dtype)) * self.scale


class Int4Linear(Linear):
    """Group-wise (32) asymmetric int4 weights with fp16 scale and minimum: GGUF Q4_1's precision."""

    def __init__(
        self, weight: torch.Tensor, backend: str | None = None, group: int = quant.INT4_GROUP
    ) -> None:
        """Quantizes `weight` as given (pass the source weights, not a bf16 rounding of them)."""
        backend = backend or default_backend(weight)
        if backend == "torch" and weight.shape[0] % 16:
            backend = "plain"  # PyTorch's CPU int4 packing needs out_features divisible by 16
        super().__init__(weight.shape[0], weight.shape[1], backend)
        self.group = group
        q, scale, lo = quant.quantize_int4(weight, group)
        if backend in ("kernel", "vnni"):
            pack = quant.pack_int4 if backend == "kernel" else quant.pack_vnni_int4
            self.register_buffer("packed", pack(q))
            self.register_buffer("scales", quant.pack_int4_scales(scale, lo))
        elif backend == "torch":
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
            # PyTorch's int4 convention: w = (q - 8)·scale + zero, scales and zeros as [K/group, N, 2].
            zero = lo.float() + 8 * scale.float()
            scales = torch.stack([scale.float(), zero], -1).transpose(0, 1)
            self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        else:
            self.register_buffer("q", q)
            self.register_buffer("scales", torch.stack([scale, lo]))

    def kernel_weight(self) -> tuple[int, torch.Tensor, torch.Tensor | None, int]:
        if self.backend not in ("kernel", "vnni"):
            return super().kernel_weight()
        return VNNI_INT4 if self.backend == "vnni" else INT4, self.packed, self.scales, self.group

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend in ("kernel", "vnni"):
            return self._kernel_mm(x)
        if self.backend == "torch":
            xb = x.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales)
            return y.to(x.dtype)
        w = quant.dequantize_int4(self.q, self.scales[0], self.scales[1])
        return F.linear(x, w.to(x.dtype))


class Int8GroupLinear(Linear):
    """Symmetric int8 weights with an fp16 scale per group of 32: GGUF Q8_0's precision (exact for it).
    Runs on the vnni backend, or plain."""

    def __init__(
        self, weight: torch.Tensor, backend: str | None = None, group: int = quant.INT4_GROUP
    ) -> None:
        if backend is None:
            mod = kernels.ops() if weight.device.type == "cpu" else None
            backend = "vnni" if mod is not None else "plain"
        super().__init__(weight.shape[0], weight.shape[1], backend)
        self.group = group
        q, scale = quant.quantize_int8_groups(weight, group)
        if backend == "vnni":
            self.register_buffer("packed", quant.pack_vnni_int8(q))
            # vpdpbusd reads q + 128: the min term -128·d takes the offset back out.
            self.register_buffer("scales", quant.pack_int4_scales(scale, (-128 * scale.float()).half()))
        else:
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)

    def kernel_weight(self) -> tuple[int, torch.Tensor, torch.Tensor | None, int]:
        if self.backend != "vnni":
            return super().kernel_weight()
        return VNNI_INT8, self.packed, self.scales, self.group

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "vnni":
            return self._kernel_mm(x)
        return F.linear(x, quant.dequantize_int8_groups(self.q, self.scale).to(x.dtype))


def make_linear(weight: torch.Tensor, quantization: str, dtype: torch.dtype, vnni: bool = False) -> Linear:
    """The layer for one source weight [out, in] at a precision: none stores it in `dtype`; int8/int4
    quantize it as given (a Q4_1 GGUF's weights then requantize to int4 exactly) for `dtype` activations.
    vnni: int8 and int4 on the vpdpbusd kernels (int8 then per group of 32, as GGUF's Q8_0).

    int4 needs in_features divisible by 32; a layer that is not gets int8 instead.
    """
    if vnni and quantization in ("int8", "int4") and weight.shape[1] % quant.INT4_GROUP == 0:
        return Int4Linear(weight, "vnni") if quantization == "int4" else Int8GroupLinear(weight, "vnni")
    if quantization == "none":
        return DenseLinear(weight.to(dtype))
    if quantization == "int8" or (quantization == "int4" and weight.shape[1] % quant.INT4_GROUP):
        return Int8Linear(weight, dtype)
    if quantization == "int4":
        return Int4Linear(weight)
    raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
