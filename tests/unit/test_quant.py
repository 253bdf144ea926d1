"""Weight-only int8/int4 quantization and the linear layers: every backend computes x·Wᵀ of the
weights it stores, the C++ block layout handles ragged shapes, and a quantized model stays close."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tailserve.layers import kernels, linear, quant
from tailserve.layers.linear import DenseLinear, Int4Linear, Int8GroupLinear, Int8Linear, make_linear
from tests.tiny import TINY, tiny_weights

FAST = kernels.ops() is not None


def test_int8_roundtrip_error_is_within_half_a_step() -> None:
    w = torch.randn(40, 64)
    q, scale = quant.quantize_int8(w)
    err = (quant.dequantize_int8(q, scale) - w).abs()
    assert q.dtype == torch.int8 and bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int4_reproduces_q4_1_weights_exactly() -> None:
    """Weights that are already d·q + m with fp16 d, m (GGUF Q4_1) come back bit for bit."""
    g = torch.Generator().manual_seed(0)
    n, k = 8, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    q[:, ::32] = 0  # every group spans the full 0..15 range, as Q4_1's quantizer makes it
    q[:, 1::32] = 15
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half()
    m = (-torch.rand(n, k // 32, generator=g) * 0.1).half()
    w = quant.dequantize_int4(q, d, m)
    q2, d2, m2 = quant.quantize_int4(w)
    assert torch.equal(quant.dequantize_int4(q2, d2, m2), w)


SHAPES = [(64, 64), (40, 96), (100, 32)]  # ragged n: padded blocks


@pytest.mark.parametrize(
    ("cls", "backend"),
    [
        (c, b)
        for c in (DenseLinear, Int8Linear, Int4Linear)
        for b in ("torch", "plain")
        if (c, b) != (DenseLinear, "plain")
    ],
)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_linear_backends_compute_their_weights(cls, backend, n, k) -> None:
    check_linear(cls, backend, n, k)


@pytest.mark.parametrize("cls", [DenseLinear, Int8Linear, Int4Linear])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernel_linears_compute_their_weights(cls, n, k, cpu_tier: str) -> None:
    check_linear(cls, "kernel", n, k)


def check_linear(cls, backend: str, n: int, k: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).bfloat16()
    layer = cls(w, torch.bfloat16, backend=backend) if cls is Int8Linear else cls(w, backend=backend)
    if cls is Int8Linear:
        ref_w = quant.dequantize_int8(*quant.quantize_int8(w))
    elif cls is Int4Linear:
        ref_w = quant.dequantize_int4(*quant.quantize_int4(w))
    else:
        ref_w = w.float()
    for m in (1, 5, 9):  # below, between and above the kernel's row tiles
        x = torch.randn(2, m, k).bfloat16()  # a leading batch dim is kept
        y = layer(x)
        assert y.shape == (2, m, n) and y.dtype == x.dtype
        ref = F.linear(x.float(), ref_w)
        torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_int8_groups_reproduce_q8_0_weights_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    q[:, ::32] = 127  # Q8_0's quantizer maps each group's largest magnitude to ±127
    d = (torch.rand(8, 2, generator=g) * 0.01 + 1e-3).half()
    w = quant.dequantize_int8_groups(q, d)
    assert torch.equal(quant.dequantize_int8_groups(*quant.quantize_int8_groups(w)), w)


def int8_rows(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x rounded as the vnni kernels take it: int8 per row and group, scale max|x| / 127."""
    g = x.float().reshape(*x.shape[:-1], -1, group)
    s = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / s.clamp(min=1e-30)) * s).reshape(x.shape)


@pytest.mark.parametrize("cls", [Int4Linear, Int8GroupLinear])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (40, 96), (100, 32), (48, 1536)])
def test_vnni_linears_compute_their_weights_on_int8_inputs(cls, n, k, cpu_tier: str) -> None:
    """Exact up to fp32 rounding against the stored weights times the int8-rounded input; rows are
    independent (the same numbers whatever the batch)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).bfloat16()
    layer = cls(w, backend="vnni")
    ref_w = (
        quant.dequantize_int4(*quant.quantize_int4(w))
        if cls is Int4Linear
        else quant.dequantize_int8_groups(*quant.quantize_int8_groups(w))
    )
    x = torch.randn(9, k).bfloat16()
    x[2, :32] = 0  # a group of zeros: scale 0, no division by it
    y = layer(x)
    ref = F.linear(int8_rows(x), ref_w)
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    for m in (1, 3, 5):  # below, at and above the kernel's row tile
        assert torch.equal(layer(x[:m]), y[:m])
    plain = cls(w, backend="plain")  # the same weights on the portable path, fp activations
    torch.testing.assert_close(
        plain(x).float(), F.linear(x.float(), ref_w), atol=2e-2 * ref.abs().max().item(), rtol=0
    )


def test_make_linear_picks_the_layer() -> None:
    w = torch.randn(64, 64)
    assert isinstance(make_linear(w, "none", torch.float32), DenseLinear)
    assert isinstance(make_linear(w, "int8", torch.bfloat16), Int8Linear)
    assert isinstance(make_linear(w, "int4", torch.bfloat16), Int4Linear)
    assert isinstance(make_linear(torch.randn(64, 48), "int4", torch.bfloat16), Int8Linear)  # 48 % 32 != 0
    if FAST:
        assert make_linear(w, "int4", torch.bfloat16, vnni=True).backend == "vnni"
        assert isinstance(make_linear(w, "int8", torch.bfloat16, vnni=True), Int8GroupLinear)
    with pytest.raises(ValueError, match="unknown quantization"):
        make_linear(w, "int3", torch.bfloat16)


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_model_on_default_backends_matches_plain_fp32(quantization: str) -> None:
    """Same quantized weights, bf16 activations on the fast backends vs fp32 dequantize-and-matmul:
    the next-token distributions agree (KL ≈ bf16 rounding), so the fast paths add no error of their own."""
    from tailserve.models.llama import LlamaModel
    from tests.unit.test_kernels import prefill_logits

    weights = tiny_weights(TINY)
    with mock.patch.object(linear, "default_backend", return_value="plain"):
        ref = prefill_logits(LlamaModel(TINY, weights, torch.float32, quantization).eval())
    got = prefill_logits(LlamaModel(TINY, weights, torch.bfloat16, quantization).eval())
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 0.01
