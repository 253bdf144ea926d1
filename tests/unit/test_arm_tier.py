"""The neon-dotprod tier (AArch64) on an x86 machine: the fused step's kernels (csrc/linear.h,
csrc/attention.h over simd.h's NEON branch) cross-compiled with Debian's g++-aarch64-linux-gnu and run
under qemu-user, on weights packed by layers/quant.py, against PyTorch. On an AArch64 machine the tier
runs natively and the rest of the suite covers it (tests/conftest.py's cpu_tier)."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tailserve.layers import kernels, quant
from tailserve.layers.linear import DenseLinear, Int4Linear, Int8GroupLinear, Int8Linear
from tailserve.models.loader import cache_home

CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
SOURCE = Path(__file__).resolve().parent.parent / "native" / "kernel_check.cpp"
FLAGS = ["-O2", "-std=c++17", *kernels.tier_flags("neon-dotprod"), "-static"]

pytestmark = pytest.mark.skipif(
    not (shutil.which(CXX) and shutil.which(QEMU)),
    reason=f"needs {CXX} and {QEMU} (Debian: g++-aarch64-linux-gnu, qemu-user) to run the AArch64 tier here",
)

KINDS = {"bf16": 0, "int8": 1, "int4": 2, "u4": 3, "u8": 4}


@pytest.fixture(scope="module")
def binary() -> Path:
    """The harness for AArch64, built once per source and flags (cached like the kernels' builds)."""
    h = hashlib.sha256(" ".join(FLAGS).encode() + SOURCE.read_bytes())
    for f in sorted(kernels.CSRC.glob("*.h")):
        h.update(f.read_bytes())
    out = cache_home() / "native" / f"kernel_check-aarch64-{h.hexdigest()[:12]}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        cmd = [CXX, *FLAGS, f"-I{kernels.CSRC}", str(SOURCE), "-o", str(tmp)]
        subprocess.run(cmd, check=True, timeout=600)
        tmp.replace(out)
    return out


def run(binary: Path, tmp_path: Path, records: list[bytes]) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(records) + struct.pack("<q", 0))
    done = subprocess.run(
        [QEMU, "-cpu", "max", str(binary), str(src), str(dst)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "neon-dotprod"  # simd.h's NEON branch, not the portable fallback
    return np.frombuffer(dst.read_bytes(), dtype=np.uint16)


def bf16_bits(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def from_bf16(bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).float().reshape(shape)


def header(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def int8_rows(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x as the u4/u8 kernels take it: int8 per row and group, scale max|x| / 127."""
    g = x.float().reshape(*x.shape[:-1], -1, group)
    s = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / s.clamp(min=1e-30)) * s).reshape(x.shape)


def linear_case(kind: str, n: int, k: int, m: int, seed: int) -> tuple[bytes, torch.Tensor, float]:
    """The record of one packed linear, the reference y, and its tolerance."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    x[0, :32] = 0  # a group of zeros: scale 0, no division by it
    if kind == "bf16":
        layer, ref_w, scales = DenseLinear(w, backend="kernel"), w.float(), b""
    elif kind == "int8":
        layer = Int8Linear(w, torch.bfloat16, backend="kernel")
        ref_w, scales = quant.dequantize_int8(*quant.quantize_int8(w)), layer.scale.numpy().tobytes()
    elif kind in ("int4", "u4"):
        layer = Int4Linear(w, backend="kernel" if kind == "int4" else "vnni")
        ref_w = quant.dequantize_int4(*quant.quantize_int4(w))
    else:
        layer = Int8GroupLinear(w, backend="vnni")
        ref_w = quant.dequantize_int8_groups(*quant.quantize_int8_groups(w))
    if kind in ("int4", "u4", "u8"):
        scales = layer.scales.contiguous().view(torch.int16).numpy().tobytes()
    packed = layer.packed.contiguous().view(torch.uint8).numpy().tobytes()
    ref = F.linear(int8_rows(x) if kind in ("u4", "u8") else x.float(), ref_w)
    rec = header(1, KINDS[kind], n, k, 32, m, len(packed), len(scales)) + packed + scales + bf16_bits(x)
    return rec, ref, 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_linears_on_neon_compute_their_weights(binary: Path, tmp_path: Path, kind: str) -> None:
    shapes = [(64, 64, 1), (40, 96, 5), (100, 32, 9), (48, 1536, 3)]  # ragged blocks, row tiles, long K
    cases = [linear_case(kind, n, k, m, seed) for seed, (n, k, m) in enumerate(shapes)]
    flat = run(binary, tmp_path, [rec for rec, _, _ in cases])
    at = 0
    for _, ref, tol in cases:
        y = from_bf16(flat[at : at + ref.numel()], tuple(ref.shape))
        at += ref.numel()
        torch.testing.assert_close(y, ref, atol=tol, rtol=0)
    assert at == flat.size


def pair_layout(kv: torch.Tensor, which: str) -> torch.Tensor:
    """[blocks, Hkv, bs, D] → the fused step's pair layout (csrc/attention.h: k_index, v_index)."""
    b, h, bs, d = kv.shape
    if which == "k":
        return kv.reshape(b, h, bs, d // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    return kv.reshape(b, h, bs // 2, 2, d).permute(0, 1, 2, 4, 3).contiguous()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "window"),
    [(9, 3, 64, 0), (4, 4, 32, 0), (8, 1, 128, 0), (4, 1, 256, 20)],  # SmolLM2; MHA; GQA 8; Gemma 3
)
def test_pair_attention_on_neon_matches_softmax(
    binary: Path, tmp_path: Path, heads: int, kv_heads: int, dim: int, window: int
) -> None:
    """Ragged causal contexts over scattered blocks, the GQA groups the kernel instantiates, and a
    sliding window (the last `window` tokens)."""
    g = torch.Generator().manual_seed(heads * dim)
    bs, lens = 16, [1, 15, 16, 17, 70]
    cols = -(-max(lens) // bs)
    blocks = len(lens) * cols + 2
    table = torch.randperm(blocks, generator=g)[: len(lens) * cols].view(len(lens), cols)
    k = torch.randn(blocks, kv_heads, bs, dim, generator=g).bfloat16()
    v = torch.randn(blocks, kv_heads, bs, dim, generator=g).bfloat16()
    q = torch.randn(len(lens), heads, dim, generator=g)
    scale = dim**-0.5
    rec = (
        header(2, len(lens), heads, kv_heads, dim, bs, blocks, cols, window)
        + q.numpy().tobytes()
        + bf16_bits(pair_layout(k, "k"))
        + bf16_bits(pair_layout(v, "v"))
        + table.numpy().astype(np.int64).tobytes()
        + np.asarray(lens, dtype=np.int64).tobytes()
        + struct.pack("<f", scale)
    )
    out = from_bf16(run(binary, tmp_path, [rec]), (len(lens), heads, dim))
    group = heads // kv_heads
    for n, ctx in enumerate(lens):
        pos = torch.arange(max(0, ctx - window) if window else 0, ctx)
        rows = table[n, pos // bs]
        kn = k[rows, :, pos % bs].double().repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        vn = v[rows, :, pos % bs].double().repeat_interleave(group, 1).transpose(0, 1)
        qn = q[n].bfloat16().double()  # the kernel takes q in bf16
        att = torch.softmax(qn[:, None] @ kn.transpose(1, 2) * scale, -1)
        torch.testing.assert_close(out[n].double(), (att @ vn)[:, 0], atol=2e-2, rtol=0)
