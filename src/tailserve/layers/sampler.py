"""Next-token choice for a batch of rows, each with its own parameters, on numpy (the serving path does
not import torch: logits arrive as a float32 [rows, vocab] array).

Greedy rows take the argmax in one batched call. Random rows draw with their own generator when
seeded, one uniform number per draw, so a seeded request gives the same tokens whatever else shares
its batch. Logprobs are of the model's distribution (before temperature/top-k/top-p), as OpenAI
reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tailserve.sampling import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    generator: np.random.Generator | None
    banned_token_ids: list[int]  # e.g. end-of-sequence tokens before min_tokens is reached


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # (chosen logprob, top-k) per row


BLOCK = 256  # weights per block of the two-level running sums below


def exp_weights(logits: np.ndarray, peak: float | np.ndarray) -> np.ndarray:
    """exp(logits - peak), -inf (a banned or filtered token) giving 0. In float32 where every logit is
    within 80 of the peak; else (a row with -inf in it too) in float64: a float32 exp of a logit ~90
    below the peak (a peaked row, more so after a temperature below 1) returns a subnormal, which x86
    computes ~10x slower (a row took ~250 µs instead of ~30; float64's take ~60 µs, and its subnormals
    start ~700 below)."""
    d = logits - peak
    if float(d.min()) > -80.0:
        return np.exp(d, out=d)
    return np.exp(d, dtype=np.float64)


def block_ends(weights: np.ndarray) -> np.ndarray:
    """The running sum of `weights` (float64) at the end of each block of BLOCK."""
    return np.cumsum(np.add.reduceat(weights, np.arange(0, len(weights), BLOCK), dtype=np.float64))


def first_reaching(weights: np.ndarray, ends: np.ndarray, target: float) -> int:
    """The first index whose running sum of `weights` (≥ 0) reaches target ∈ (0, total]; ends: their
    `block_ends`. A search over the block ends, then a running sum over one block: one float64 running
    sum over all of a row's 49152 weights costs ~6x more. A zero weight is never the answer."""
    j = int(np.searchsorted(ends, target))
    start = j * BLOCK
    within = np.cumsum(weights[start : start + BLOCK], dtype=np.float64)
    rest = target - (ends[j - 1] if j else 0.0)
    return start + int(np.searchsorted(within, min(rest, within[-1])))


def draw(weights: np.ndarray, generator: np.random.Generator) -> int:
    """An index drawn in proportion to `weights` (≥ 0, not all 0, unnormalized), from one uniform number
    (a seeded row's draws then depend on nothing but its own logits)."""
    ends = block_ends(weights)
    return first_reaching(weights, ends, (1.0 - generator.random()) * ends[-1])


CANDIDATES = 1024  # top-p looks for its cut among this many most likely tokens first


def cutoff(logits: np.ndarray, top_k: int, top_p: float) -> float:
    """The least logit of one row [vocab] that top-k, then top-p, keep (-inf: they keep every token).
    A threshold rather than a list of tokens: tokens tied with the last one kept stay too."""
    kept, least = logits, -np.inf
    n = len(logits)
    if 0 < top_k < n:
        least = np.partition(logits, n - top_k)[n - top_k]
        kept = logits[logits >= least]
    if top_p < 1.0:
        # The cut lies among the most likely tokens whenever their mass reaches top_p: then only they
        # are sorted (a full sort of 49k logits was most of a top-p row's ~0.3 ms), else all are.
        candidates, total = kept, None
        if len(kept) > CANDIDATES:
            peak = kept.max()
            total = exp_weights(kept, peak).sum(dtype=np.float64)
            top = kept[kept >= np.partition(kept, len(kept) - CANDIDATES)[len(kept) - CANDIDATES]]
            if exp_weights(top, peak).sum(dtype=np.float64) >= top_p * total:
                candidates = top
        desc = -np.sort(-candidates)
        mass = exp_weights(desc, desc[0])
        ends = block_ends(mass)
        target = top_p * ends[-1] if total is None else min(top_p * total, ends[-1])
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        least = desc[min(first_reaching(mass, ends, target), len(desc) - 1)]
    return float(least)


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """logits [rows, vocab] with the tokens top-k then top-p drop, row by row, set to -inf."""
    if not 0 < top_k < logits.shape[-1] and top_p >= 1.0:
        return logits
    least = np.array([[cutoff(row, top_k, top_p)] for row in logits], dtype=logits.dtype)
    return np.where(logits >= least, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = exp_weights(logits, logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_row(logits: np.ndarray, params: SamplingParams, generator: np.random.Generator) -> int:
    """One row's token [vocab] under temperature, top-k and top-p; only the kept tokens are weighed."""
    scaled = logits / params.temperature
    least = cutoff(scaled, params.top_k, params.top_p)
    if least == -np.inf:
        return draw(exp_weights(scaled, scaled.max()), generator)
    ids = np.flatnonzero(scaled >= least)
    kept = scaled[ids]
    return int(ids[draw(exp_weights(kept, kept.max()), generator)])


def row_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s logprob in one row [vocab], and the k most likely tokens' (most likely first, ties:
    lower id first). log_softmax is x - max - log Σ exp(x - max): only the sum is over the row."""
    peak = logits.max()
    log_sum = np.log(np.exp(logits - peak).sum())  # (summed as float32: subnormals cost nothing here)
    ids = np.argpartition(logits, -k)[-k:] if k else np.empty(0, dtype=np.intp)
    ids = ids[np.lexsort((ids, -logits[ids]))]
    values = (logits[ids] - peak) - log_sum
    return float((logits[token] - peak) - log_sum), list(zip(ids.tolist(), values.tolist()))


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = np.random.default_rng(seed)  # rows without a seed of their own

    def __call__(self, logits: np.ndarray, rows: list[SampleRow]) -> SampleResult:
        """logits: [N, vocab] float32, one row per entry of `rows` (banned tokens are set to -inf in it)."""
        for i, row in enumerate(rows):
            if row.banned_token_ids:
                logits[i, row.banned_token_ids] = -np.inf
        if all(row.params.greedy for row in rows):
            token_ids = np.argmax(logits, axis=-1).tolist()
        else:
            token_ids = [
                int(np.argmax(logits[i]))
                if row.params.greedy
                else sample_row(logits[i], row.params, row.generator or self.generator)
                for i, row in enumerate(rows)
            ]
        logprobs = [
            None
            if row.params.logprobs is None
            else row_logprobs(logits[i], token_ids[i], row.params.logprobs)
            for i, row in enumerate(rows)
        ]
        return SampleResult(token_ids, logprobs)
