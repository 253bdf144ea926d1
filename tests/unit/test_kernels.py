"""The C++ paged decode attention equals the PyTorch gather + SDPA path: ragged contexts, block
boundaries, GQA groups, block tables or slot lists, fp32 and bf16 pools."""

from __future__ import annotations

import shutil
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tailserve.layers import kernel_ops, kernels
from tailserve.layers.attention import AttentionMetadata, PrefillChunk, paged_attention, write_kv

if kernels.ops() is None and shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ toolchain: the kernels cannot be built here", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def ops(cpu_tier: str):
    """The kernels of each CPU tier in turn (the fixture skips a tier this CPU cannot run)."""
    return kernels.ops()


def make_case(
    lens: list[int], heads: int, kv_heads: int, dim: int, block: int, dtype: torch.dtype, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    nblk = -(-max(lens) // block)
    num_blocks = len(lens) * nblk + 3
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * nblk].view(len(lens), nblk)
    kc = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return q, kc, vc, tables, torch.tensor(lens)


def reference(q, kc, vc, tables, lens, block):
    """Per sequence, in float64: softmax(q·Kᵀ·scale)·V over its own context."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // kc.shape[1]
    for n, ctx in enumerate(lens.tolist()):
        pos = torch.arange(ctx)
        slots = tables[n, pos // block] * block + pos % block
        k = kc[slots].double().repeat_interleave(group, 1).transpose(0, 1)  # [H, L, D]
        v = vc[slots].double().repeat_interleave(group, 1).transpose(0, 1)
        att = torch.softmax(q[n].double()[:, None] @ k.transpose(1, 2) * q.shape[2] ** -0.5, -1)
        out[n] = (att @ v)[:, 0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 16)],  # SmolLM2's GQA; MHA; Llama's D; generic path
)
def test_decode_attention_matches_reference(ops, dtype, heads, kv_heads, dim) -> None:
    block = 4
    lens = [1, 3, 4, 5, 31, 32, 33, 70]  # single token, block and tile (32) boundaries, several tiles
    q, kc, vc, tables, lens_t = make_case(lens, heads, kv_heads, dim, block, dtype)
    want = reference(q, kc, vc, tables, lens_t, block)
    got = kernel_ops.decode_attention(q, kc, vc, tables, block, lens_t, dim**-0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])
    # The same rows addressed through a padded slot matrix (block size 1) give the same result.
    pos = torch.arange(max(lens))
    slots = tables[:, pos // block] * block + pos % block
    torch.testing.assert_close(
        kernel_ops.decode_attention(q, kc, vc, slots, 1, lens_t, dim**-0.5), got, atol=0, rtol=0
    )


def test_decode_attention_rejects_bad_lengths(ops) -> None:
    q, kc, vc, tables, _ = make_case([5], 4, 2, 16, 4, torch.float32)
    with pytest.raises(RuntimeError, match="context length"):
        kernel_ops.decode_attention(q, kc, vc, tables, 4, torch.tensor([9]), 0.25)  # 2 blocks hold 8 tokens
    with pytest.raises(RuntimeError, match="context length"):
        kernel_ops.decode_attention(q, kc, vc, tables, 4, torch.tensor([0]), 0.25)


def mixed_batch(dtype: torch.dtype, block: int = 4):
    """Three decodes (ragged) and a prefill chunk with cached context, as the runner lays them out."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim = 6, 2, 64
    kc = torch.randn(64 * block, kv_heads, dim, generator=g).to(dtype)
    vc = torch.randn(64 * block, kv_heads, dim, generator=g).to(dtype)
    lens = torch.tensor([9, 1, 16])
    tables = torch.tensor([[5, 9, 2, 0], [7, 0, 0, 0], [11, 3, 4, 8]])
    chunk_blocks, start, n = [20, 21, 22], 5, 4
    pos = torch.arange(start + n)
    chunk_slots = torch.tensor(chunk_blocks)[pos // block] * block + pos % block
    dec_slots = tables[torch.arange(3), (lens - 1) // block] * block + (lens - 1) % block
    t = 3 + n
    q = torch.randn(t, heads, dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, dim, generator=g).to(dtype)
    chunk = PrefillChunk(
        start=3,
        length=n,
        context_len=start + n,
        context_slots=chunk_slots,
        causal_mask=torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None],
    )
    meta = AttentionMetadata(
        slot_mapping=torch.cat([dec_slots, chunk_slots[start:]]),
        num_decode=3,
        prefills=[chunk],
        block_size=block,
        decode_block_tables=tables,
        decode_context_lens=lens,
    )
    write_kv(kc, vc, k, v, meta.slot_mapping)
    return q, k, v, kc, vc, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_kernel_equals_fallback(ops, dtype) -> None:
    q, k, v, kc, vc, meta = mixed_batch(dtype)
    got = paged_attention(q, k, v, kc, vc, meta, 0.125)
    with mock.patch.object(kernels, "ops", return_value=None):
        want = paged_attention(q, k, v, kc, vc, AttentionMetadata(**vars(meta)), 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # Metadata in the runner's padded-slot form reaches the same result on both paths.
    slots, mask = AttentionMetadata(**vars(meta)).padded_decode()
    padded = AttentionMetadata(meta.slot_mapping, 3, slots, mask, meta.prefills)
    torch.testing.assert_close(paged_attention(q, k, v, kc, vc, padded, 0.125), got, atol=0, rtol=0)


def test_decode_matches_sdpa_on_one_token_batches(ops) -> None:
    """Decode-only batches return the kernel's output directly (no copy into a preallocated out)."""
    q, kc, vc, tables, lens = make_case([7, 12], 9, 3, 64, 4, torch.float32)
    meta = AttentionMetadata(
        torch.zeros(2, dtype=torch.long),
        2,
        block_size=4,
        decode_block_tables=tables,
        decode_context_lens=lens,
    )
    got = paged_attention(q, q[:, :3], q[:, :3], kc, vc, meta, 0.125)
    slots, mask = meta.padded_decode()
    want = F.scaled_dot_product_attention(
        q.view(2, 3, 3, 64), kc[slots].transpose(1, 2), vc[slots].transpose(1, 2), attn_mask=mask, scale=0.125
    ).reshape(2, 9, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def prefill_logits(model, ids: list[int] | None = None) -> torch.Tensor:
    """Float logits of every position of one sequence prefilled in one chunk."""
    ids = ids or list(range(3, 40))
    c = model.config
    t = len(ids)
    pools = [
        (torch.zeros(t, c.num_kv_heads, c.head_dim, dtype=model.embed.dtype),) * 2
        for _ in range(c.num_layers)
    ]
    pools = [(torch.zeros_like(a), torch.zeros_like(a)) for a, _ in pools]
    meta = AttentionMetadata(torch.arange(t), 0, prefills=[PrefillChunk(0, t, t, None, None)])
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(t), pools, meta)).float()
