"""Token bitmasks → logit biases, and the mask bookkeeping of constrained rows (engine/masks.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tailserve.structured.bitmask import apply_bitmask, restricted_rows, to_bias


def random_mask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    bits = g.integers(0, 2**32, size=(rows, (vocab + 31) // 32), dtype=np.uint64).astype(np.uint32)
    bits[0] = 0xFFFFFFFF  # one row allows everything
    return torch.from_numpy(bits.view(np.int32).copy())


def allowed_by_bits(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    words = mask.numpy().view(np.uint32).astype(np.int64)
    t = np.arange(vocab)
    return torch.from_numpy((words[:, t // 32] >> (t % 32)) & 1 == 1)


@pytest.mark.parametrize(("vocab", "width"), [(96, 96), (100, 100), (100, 110), (100, 90)])
def test_bias_follows_the_bits(vocab: int, width: int) -> None:
    mask = random_mask(5, vocab, seed=vocab + width)
    bias = to_bias(mask, vocab, width)
    assert bias.shape == (5, width)
    want = torch.full((5, width), float("-inf"))
    keep = min(vocab, width)
    want[:, :keep] = torch.where(allowed_by_bits(mask, vocab)[:, :keep], 0.0, float("-inf"))
    assert torch.equal(bias, want)


def test_restricted_rows_ignore_bits_past_the_vocabulary() -> None:
    vocab = 70  # three words, the last one partly past the vocabulary
    mask = torch.full((3, 3), -1, dtype=torch.int32)
    mask[1, 2] = 0b111111  # tokens 64..69 allowed, the bits past them clear: still unrestricted
    mask[2, 2] = 0b011111  # token 69 forbidden
    assert restricted_rows(mask, vocab).tolist() == [False, False, True]


def test_apply_keeps_allowed_logits_exactly() -> None:
    mask = random_mask(4, 300, seed=1)
    logits = torch.randn(4, 300)
    out = logits.clone()
    apply_bitmask(out, mask)
    allowed = allowed_by_bits(mask, 300)
    assert torch.equal(out[allowed], logits[allowed])
    assert torch.isneginf(out[~allowed]).all()
