"""The numpy sampler (layers/sampler.py): seeded rows independent of their batch, draws that follow
their weights, top-k/top-p as specified, logprobs of the model's own distribution."""

from __future__ import annotations

import numpy as np
import pytest

from tailserve.layers.sampler import (
    BLOCK,
    Sampler,
    SampleRow,
    cutoff,
    draw,
    exp_weights,
    filter_top_k_top_p,
    softmax,
)
from tailserve.sampling import SamplingParams

SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)


def logits_of(rows: int, vocab: int = 1000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * 3).astype(np.float32)


def close(counts: np.ndarray, p: np.ndarray) -> bool:
    """Every token's share of the draws within 5 standard deviations of its probability."""
    n = counts.sum()
    return bool((np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9).all())


def tokens(logits: np.ndarray, rows: list[SampleRow], steps: int = 20) -> list[list[int]]:
    sampler = Sampler(seed=5)
    return [sampler(logits.copy(), rows).token_ids for _ in range(steps)]


def test_a_seeded_row_gives_the_same_tokens_alone_or_batched() -> None:
    x = logits_of(4)
    alone = tokens(x[2:3], [SampleRow(SAMPLED, np.random.default_rng(7), [])])
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3), SamplingParams(top_p=0.5)]
    rows = [SampleRow(p, None, []) for p in others]
    batched = tokens(x, [*rows[:2], SampleRow(SAMPLED, np.random.default_rng(7), []), rows[2]])
    assert [b[2] for b in batched] == [a[0] for a in alone]
    other_seed = tokens(x[2:3], [SampleRow(SAMPLED, np.random.default_rng(8), [])])
    assert other_seed != alone


@pytest.mark.parametrize("n", [3, BLOCK, 3 * BLOCK + 17])
def test_draws_follow_the_weights_and_never_pick_a_zero(n: int) -> None:
    g = np.random.default_rng(n)
    w = np.where(g.random(n) < 0.5, 0.0, g.random(n)).astype(np.float32)
    w[[0, -1]] = 0.0
    w[n // 2] = 1.0
    counts = np.bincount([draw(w, g) for _ in range(50_000)], minlength=n)
    assert counts[w == 0].sum() == 0
    assert close(counts, w / w.sum())


@pytest.mark.parametrize(
    ("vocab", "scale"),
    [
        (1000, 3.0),
        (49152, 3.0),
        (49152, 12.0),
    ],  # beyond CANDIDATES: a flat row (the cut beyond them) and a peaked one
)
def test_top_k_then_top_p_keep_what_the_rule_says(vocab: int, scale: float) -> None:
    x = logits_of(1, vocab)[0] * (scale / 3.0)
    for top_k, top_p in [(0, 0.9), (50, 1.0), (50, 0.6), (-1, 0.3), (0, 1e-9), (0, 0.99), (2000, 0.95)]:
        kept = np.isfinite(filter_top_k_top_p(x[None], top_k, top_p)[0])
        order = np.argsort(-x)
        if top_k > 0:
            order = order[:top_k]
        p = softmax(x[order].astype(np.float64))
        before = np.cumsum(p) - p  # a token is dropped once the mass before it reaches top_p
        want = np.zeros(len(x), bool)
        want[order[(before < top_p) | (np.arange(len(order)) == 0)]] = True
        assert (kept == want).all(), (top_k, top_p)
    ties = np.array([3.0, 1.0, 3.0, 2.0, 3.0], np.float32)
    assert cutoff(ties, 2, 1.0) == 3.0  # top-k keeps every token tied with the k-th


def test_sampled_tokens_follow_the_filtered_distribution() -> None:
    x = logits_of(1, vocab=300, seed=3)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    want = softmax(filter_top_k_top_p(x / 0.7, 20, 0.8))[0]
    n = 40_000
    got = np.bincount(
        Sampler(1)(np.repeat(x, n, axis=0), [SampleRow(params, None, [])] * n).token_ids, minlength=300
    )
    assert got[want == 0].sum() == 0
    assert close(got, want)


def test_logprobs_are_the_models_before_temperature_and_banned_tokens_never_come() -> None:
    x = logits_of(2)
    params = SamplingParams(temperature=0.5, top_k=3, logprobs=4)
    out = Sampler(0)(x.copy(), [SampleRow(params, None, [int(x[0].argmax())]), SampleRow(params, None, [])])
    banned = x[0].copy()
    banned[x[0].argmax()] = -np.inf
    for row, lp in zip((banned, x[1]), out.logprobs):
        ref = row.astype(np.float64) - row.max() - np.log(np.exp(row.astype(np.float64) - row.max()).sum())
        top = lp[1]
        assert [t for t, _ in top] == np.argsort(-ref, kind="stable")[:4].tolist()
        assert np.allclose([v for _, v in top], np.sort(ref)[::-1][:4], atol=1e-5)
    assert out.token_ids[0] != x[0].argmax()
    assert np.isclose(
        out.logprobs[1][0], np.log(softmax(x[1].astype(np.float64))[out.token_ids[1]]), atol=1e-5
    )


def test_exp_weights_of_a_peaked_row_avoid_subnormals_and_keep_banned_tokens_at_zero() -> None:
    row = np.array([0.0, -10.0, -95.0, -np.inf, -300.0], np.float32)
    w = exp_weights(row, 0.0)
    assert w.dtype == np.float64  # -95: a subnormal in float32
    assert w[3] == 0.0 and w[4] > 0.0 and np.allclose(w[:3], np.exp(row[:3].astype(np.float64)))
    flat = exp_weights(np.array([0.0, -10.0, -79.0], np.float32), 0.0)
    assert flat.dtype == np.float32 and np.allclose(flat, np.exp([0.0, -10.0, -79.0]))
