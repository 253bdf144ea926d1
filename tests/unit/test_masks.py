"""Token bitmasks → logit biases, and the mask bookkeeping of constrained rows (engine/masks.py)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from tailserve.engine.masks import Batch, Filled, GrammarMasks
from tailserve.engine.sequence import Sequence
from tailserve.sampling import SamplingParams
from tailserve.structured.bitmask import apply_bitmask, restricted_rows, to_bias


def random_mask(rows: int, vocab: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    bits = g.integers(0, 2**32, size=(rows, (vocab + 31) // 32), dtype=np.uint64).astype(np.uint32)
    bits[0] = 0xFFFFFFFF  # one row allows everything
    return bits.view(np.int32)


def allowed_by_bits(mask: np.ndarray, vocab: int) -> np.ndarray:
    words = mask.view(np.uint32).astype(np.int64)
    t = np.arange(vocab)
    return (words[:, t // 32] >> (t % 32)) & 1 == 1


@pytest.mark.parametrize(("vocab", "width"), [(96, 96), (100, 100), (100, 110), (100, 90)])
def test_bias_follows_the_bits(vocab: int, width: int) -> None:
    mask = random_mask(5, vocab, seed=vocab + width)
    bias = to_bias(mask, vocab, width)
    assert bias.shape == (5, width) and bias.dtype == np.float32
    want = np.full((5, width), -np.inf, dtype=np.float32)
    keep = min(vocab, width)
    want[:, :keep] = np.where(allowed_by_bits(mask, vocab)[:, :keep], 0.0, -np.inf)
    assert np.array_equal(bias, want)


def test_restricted_rows_ignore_bits_past_the_vocabulary() -> None:
    vocab = 70  # three words, the last one partly past the vocabulary
    mask = np.full((3, 3), -1, dtype=np.int32)
    mask[1, 2] = 0b111111  # tokens 64..69 allowed, the bits past them clear: still unrestricted
    mask[2, 2] = 0b011111  # token 69 forbidden
    assert restricted_rows(mask, vocab).tolist() == [False, False, True]


def test_apply_keeps_allowed_logits_exactly() -> None:
    mask = random_mask(4, 300, seed=1)
    logits = np.random.default_rng(2).standard_normal((4, 300), dtype=np.float32)
    out = logits.copy()
    apply_bitmask(out, mask)
    allowed = allowed_by_bits(mask, 300)
    assert np.array_equal(out[allowed], logits[allowed])
    assert np.isneginf(out[~allowed]).all()


def test_apply_adds_each_bias_to_its_own_row_only() -> None:
    """Biases in another order than the logits' rows, and a row whose grammar allows everything."""
    seqs = [Sequence(str(i), [1, 2], SamplingParams()) for i in range(3)]
    bias = to_bias(random_mask(2, 100, seed=3), 100, 100)
    filled: Future[Filled] = Future()
    filled.set_result(Filled({seqs[2]: 0, seqs[0]: 1}, bias))
    logits = np.random.default_rng(4).standard_normal((3, 100), dtype=np.float32)
    out = logits.copy()
    GrammarMasks(100).apply(out, seqs, [Batch({q: q.num_tokens for q in seqs}, filled)])
    assert np.array_equal(out, logits + np.stack([bias[1], np.zeros(100, np.float32), bias[0]]))
