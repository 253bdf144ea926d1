"""Lazy grammar masks (engine/masks.py): sampled first, masked only when the grammar rejects the pick.

Exactness is checked against the eager path: greedy outputs token for token on a tiny random model
(which disagrees with the schemas often, so misses are exercised), plain temperature sampling against
the masked distribution computed directly; truncated sampling and logprobs stay eager."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="structured outputs need the 'structured' extra")

from tailserve.engine.masks import GrammarMasks, lazy_allowed
from tailserve.layers.sampler import Sampler, SampleRow, softmax
from tailserve.sampling import SamplingParams
from tailserve.structured.bitmask import allocate
from tailserve.structured.grammar import GrammarCompiler, GrammarSpec, Vocabulary
from tests.tiny import TINY, run_all, tiny_engine
from tests.unit.test_structured import SCHEMAS


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    c = GrammarCompiler(Vocabulary.of_bytes(TINY.vocab_size, TINY.eos_token_ids), timeout=30.0)
    yield c
    c.shutdown()


@pytest.mark.parametrize(
    ("params", "lazy"),
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.7, top_k=1), True),  # top_k=1 is greedy
        (SamplingParams(temperature=0.7), True),
        (SamplingParams(temperature=0.7, top_k=-1), True),
        (SamplingParams(temperature=0.7, top_k=40), False),
        (SamplingParams(temperature=0.7, top_p=0.9), False),
        (SamplingParams(temperature=0.0, logprobs=2), False),
    ],
)
def test_only_untruncated_rows_without_logprobs_are_lazy(params: SamplingParams, lazy: bool) -> None:
    assert lazy_allowed(params) is lazy


def test_greedy_output_is_identical_lazy_or_eager(compiler: GrammarCompiler) -> None:
    grammars = [compiler.compile(GrammarSpec.json_schema(s)) for s in SCHEMAS]
    got = {}
    for lazy in (True, False):
        engine = tiny_engine()
        engine.masks.lazy = lazy
        for i, grammar in enumerate(grammars):
            for j, prompt in enumerate(([5, 9, 33], [70, 12, 8, 41])):
                engine.add_request(
                    f"{i}-{j}", prompt, SamplingParams(max_tokens=150, temperature=0.0), grammar=grammar
                )
        got[lazy] = run_all(engine)
        st = engine.masks.stats
        if lazy:
            assert st.lazy_hits > 0 and st.lazy_misses > 0 and st.rows == 0
        else:
            assert st.lazy_hits == st.lazy_misses == 0 and st.rows > 0
    assert got[True] == got[False]


@dataclass(eq=False)
class Row:
    grammar: Any
    params: SamplingParams


def test_sampled_lazy_rows_follow_the_masked_distribution(compiler: GrammarCompiler) -> None:
    # At the start of an integer only '-' and the digits are allowed; the model's favourites are not.
    matcher = compiler.compile(GrammarSpec.json_schema({"type": "integer"})).matcher()
    mask = allocate(1, TINY.vocab_size)
    matcher.fill(mask, 0)
    bits = mask[0].view(np.uint32)
    allowed = np.array([(int(bits[t // 32]) >> (t % 32)) & 1 == 1 for t in range(TINY.vocab_size)])
    logits = np.random.default_rng(0).standard_normal(TINY.vocab_size, dtype=np.float32)
    logits[allowed] += 2.0  # about a third of the mass allowed: both hits and misses are common
    p = softmax(logits / 0.9)
    assert 0.1 < p[allowed].sum() < 0.6
    want = np.where(allowed, p, 0.0) / p[allowed].sum()

    masks, sampler = GrammarMasks(TINY.vocab_size), Sampler(seed=1)
    params = SamplingParams(temperature=0.9)
    seqs, rows = [Row(matcher, params)] * 500, [SampleRow(params, None, [])] * 500
    counts = np.zeros(TINY.vocab_size)
    for _ in range(8):
        sample = masks.sample(sampler, np.tile(logits, (500, 1)), seqs, rows, [])
        counts += np.bincount(sample.token_ids, minlength=TINY.vocab_size)
    n = counts.sum()
    assert counts[~allowed].sum() == 0
    assert masks.stats.lazy_hits > 0.1 * n and masks.stats.lazy_misses > 0.3 * n
    # Within 5 standard deviations of the masked distribution, token by token.
    assert (np.abs(counts / n - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9).all()


def test_truncated_rows_are_masked_eagerly_beside_lazy_ones(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS[0]))
    engine = tiny_engine()
    seqs = {
        "top_p": SamplingParams(max_tokens=150, temperature=1.0, top_p=0.9, seed=0),
        "top_k": SamplingParams(max_tokens=150, temperature=1.0, top_k=20, seed=0),
        "greedy": SamplingParams(max_tokens=150, temperature=0.0),
    }
    for rid, params in seqs.items():
        engine.add_request(rid, [5, 9, 33], params, grammar=grammar)
    st = engine.masks.stats
    while engine.has_unfinished():
        all_running = all(rid in engine.requests for rid in seqs)
        eager, lazy = st.rows, st.lazy_hits + st.lazy_misses
        engine.step()
        if all_running:  # each step samples every row: the two truncated ones masked, greedy checked
            assert (st.rows - eager, st.lazy_hits + st.lazy_misses - lazy) == (2, 1)
    assert st.prefetched_rows > 0  # eager rows' masks filled while the previous step finished
