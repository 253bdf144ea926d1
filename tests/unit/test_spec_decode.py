"""Speculative decoding: guesses never change greedy output, sampled output keeps the target's
distribution, the controller backs off when guessing does not pay, and no block leaks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tailserve.engine.model_runner import kv_bytes_per_block
from tailserve.engine.sequence import Sequence
from tailserve.engine.spec_decode import Controller, NgramProposer, Proposer, SpecDecoder, SpecState, verify
from tailserve.layers.sampler import filter_top_k_top_p, softmax
from tailserve.models.fused import FusedLlama
from tailserve.sampling import SamplingParams
from tests.tiny import (
    MODEL_KINDS,
    NO_FUSED,
    TINY,
    run_all,
    tiny_engine,
    tiny_fused_model,
    tiny_model_of,
    tiny_weights,
)

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
# Prompts that repeat themselves, so the n-gram proposer has something to find.
LOOPS = [[5, 6, 7, 8, 9] * 6, [40, 41, 42] * 9 + [7], [100 + i % 11 for i in range(50)], [3, 4]]


def seq_of(ids: list[int]) -> Sequence:
    s = Sequence("r", ids, GREEDY)
    s.spec = SpecState(acceptance=0.7)
    return s


def test_ngram_proposes_the_continuation_of_the_latest_match() -> None:
    p = NgramProposer(max_n=3, min_n=1)
    s = seq_of([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3])
    assert p.propose([s], [2]) == [[7, 7]]  # the latest earlier "1 2 3" is followed by 7 7
    s.token_ids.append(7)
    assert p.propose([s], [3]) == [[7, 1, 2]]  # the index grew: "2 3 7" was followed by 7 1 2
    s.token_ids.append(5)
    assert p.propose([s], [3]) == [[]]  # "5" never came before
    assert p.propose([seq_of([1, 2, 3, 4])], [4]) == [[]]  # nothing repeats


def test_verify_greedy_accepts_the_matching_prefix_then_corrects() -> None:
    logits = np.full((4, 10), -5.0, dtype=np.float32)
    for i, t in enumerate([4, 6, 2, 8]):
        logits[i, t] = 5.0
    g = np.random.default_rng(0)
    assert verify(logits, [4, 6, 2], GREEDY, g) == ([4, 6, 2, 8], 3)  # all taken, plus a bonus
    assert verify(logits, [4, 1, 2], GREEDY, g) == ([4, 6], 1)  # the target's token at the miss
    assert verify(logits[:1], [], GREEDY, g) == ([4], 0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, max_tokens=8),
        SamplingParams(temperature=0.8, max_tokens=8, top_k=4, top_p=0.9),  # filtered row by row
    ],
)
def test_verify_sampled_keeps_the_target_distribution(params: SamplingParams) -> None:
    """Rejection sampling with point-mass guesses: the first emitted token follows p0, and the second,
    when the first guess was accepted, follows p1 — whatever the guesses are."""
    g = np.random.default_rng(0)
    logits = (g.standard_normal((3, 6)) * 1.5).astype(np.float32)
    p = softmax(filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p))
    n = 40_000
    firsts = np.zeros(6)
    seconds = np.zeros(6)
    draft = [int(p[0].argmax()), 4]
    for _ in range(n):
        tokens, _ = verify(logits, draft, params, g)
        firsts[tokens[0]] += 1
        if tokens[0] == draft[0] and len(tokens) > 1:
            seconds[tokens[1]] += 1
    assert np.abs(firsts / n - p[0]).sum() / 2 < 0.015
    assert np.abs(seconds / seconds.sum() - p[1]).sum() / 2 < 0.02


def test_controller_backs_off_and_comes_back() -> None:
    c = Controller(max_k=6)
    s = seq_of([1, 2, 3])
    assert c.choose_k(s, threshold=0.3) == 3  # 0.7³ ≥ 0.3 > 0.7⁴
    assert c.choose_k(s, threshold=1.0) == 0  # compute-bound: no guess can pay
    for _ in range(10):
        c.observe(s, 4, 0)
    assert s.spec.pause_until > c.step and c.choose_k(s, threshold=0.1) == 0
    c.step = s.spec.pause_until
    assert c.choose_k(s, threshold=0.1) >= 1  # a comeback after the pause
    assert Controller(max_k=5, adaptive=False).choose_k(s, threshold=1.0) == 5


def test_new_requests_inherit_the_proposers_record() -> None:
    """After a proposer has failed for many requests, a new one does not pay to learn it again: it
    guesses only on probe steps, one token; a proposer that succeeds lets new requests guess at once."""
    c = Controller(max_k=4)
    for i in range(100):
        s = Sequence(str(i), [1, 2], GREEDY)
        c.observe(s, 4, 0)
    fresh = Sequence("new", [1, 2], GREEDY)
    c.step = 1
    assert c.choose_k(fresh, threshold=0.1) == 0
    c.step = Controller.PROBE_EVERY
    assert c.choose_k(fresh, threshold=0.1) == 1
    good = Controller(max_k=4)
    for i in range(100):
        good.observe(Sequence(str(i), [1, 2], GREEDY), 4, 4)
    assert good.choose_k(Sequence("new", [1, 2], GREEDY), threshold=0.3) == 4


@pytest.mark.parametrize(
    ("kind", "speculative"),
    [
        pytest.param(k.values[0], speculative, marks=k.marks)
        for k in MODEL_KINDS
        for speculative in ("ngram", "draft")
        if k.values[0] != "torch" or speculative == "ngram"
    ],
)
def test_greedy_output_identical_with_guesses(kind: str, speculative: str) -> None:
    """(Draft passes run on the fused step only.)"""
    model = (
        tiny_fused_model(seed=1, draft_head=True, tier=kind.removeprefix("fused-"))
        if speculative == "draft"
        else tiny_model_of(kind, seed=1)
    )
    ref = tiny_engine(model, speculative="off")
    for i, p in enumerate(LOOPS):
        ref.add_request(str(i), p, GREEDY)
    want = run_all(ref)
    for options in ({}, {"spec_adaptive": False}, {"max_num_batched_tokens": 24, "max_num_seqs": 2}):
        eng = tiny_engine(model, speculative=speculative, draft_model="layers:1", **options)
        for i, p in enumerate(LOOPS):
            eng.add_request(str(i), p, GREEDY)
        assert run_all(eng) == want, options
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        if not options:
            continue
        assert eng.stats.spec_decode_num_draft_tokens > 0
    if speculative == "ngram":
        assert eng.stats.spec_decode_num_accepted_tokens > 0


@NO_FUSED
def test_draft_of_the_first_layers_is_accepted_when_the_rest_add_nothing(cpu_tier: str) -> None:
    """With the last layer's attention and MLP outputs zeroed, the first layer alone computes the model:
    a broken draft pass (wrong positions, KV, depth or rollback) would show as low acceptance."""
    w = tiny_weights(seed=1)
    last = f"model.layers.{TINY.num_layers - 1}."
    w[last + "self_attn.o_proj.weight"].zero_()
    w[last + "mlp.down_proj.weight"].zero_()
    model = FusedLlama.pack(TINY, w, "none", draft_head=True)
    eng = tiny_engine(model, speculative="draft", draft_model="layers:1", spec_adaptive=False)
    for i, p in enumerate(LOOPS):
        eng.add_request(str(i), p, GREEDY)
    run_all(eng)
    drafted, accepted = eng.stats.spec_decode_num_draft_tokens, eng.stats.spec_decode_num_accepted_tokens
    assert drafted > 50
    assert accepted / drafted > 0.8  # the draft head is int4: a near tie may still flip
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@NO_FUSED
@pytest.mark.parametrize("same", [True, False], ids=["draft=target", "other-draft"])
def test_separate_draft_model_keeps_output_and_its_own_kv(same: bool, cpu_tier: str) -> None:
    """A separate draft model with its own KV pool: greedy output identical, prefix-cache hits and
    preemptions (whose KV the draft never computed) caught up on, no block leaked. The target itself as
    its own draft must guess every token right: any stale or misplaced draft KV would show."""
    target = tiny_fused_model(seed=1)
    draft = target if same else tiny_fused_model(seed=2)
    ref = tiny_engine(target)
    for i, p in enumerate(LOOPS):
        ref.add_request(str(i), p, GREEDY)
    want = run_all(ref)
    per_block = kv_bytes_per_block(target, 16)
    for options in (
        {},
        {"max_num_batched_tokens": 24, "max_num_seqs": 3, "kv_cache_memory": 12 * per_block / (1 << 30)},
    ):
        eng = tiny_engine(target, draft=draft, speculative="draft", spec_adaptive=False, **options)
        for rnd in range(2):  # the second round's prompts are all in the prefix cache
            for i, p in enumerate(LOOPS):
                eng.add_request(f"{rnd}.{i}", p, GREEDY)
            got = run_all(eng)
            assert [got[f"{rnd}.{i}"] for i in range(len(LOOPS))] == [want[str(i)] for i in range(len(LOOPS))]
            assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        drafted, accepted = eng.stats.spec_decode_num_draft_tokens, eng.stats.spec_decode_num_accepted_tokens
        assert drafted > 50
        if same:
            assert accepted == drafted, options
        if options:
            assert eng.scheduler.num_preemptions > 0


@NO_FUSED
def test_draft_model_with_another_vocabulary_is_refused() -> None:
    other = FusedLlama.pack(
        replace(TINY, vocab_size=128), tiny_weights(replace(TINY, vocab_size=128)), "none"
    )
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_engine(tiny_fused_model(), draft=other, speculative="draft")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_guesses_with_prefix_cache_and_aborts_leak_nothing(kind: str) -> None:
    model = tiny_model_of(kind, seed=1)
    eng = tiny_engine(model, speculative="ngram", spec_adaptive=False)
    for i in range(6):
        eng.add_request(f"a{i}", LOOPS[0] + [i], GREEDY)
    for _ in range(4):
        eng.step()
    eng.abort("a2")
    eng.abort("a5")
    run_all(eng)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    ref = tiny_engine(model)
    ref.add_request("x", LOOPS[0] + [1], GREEDY)
    again = tiny_engine(model, speculative="ngram", spec_adaptive=False)
    again.add_request("x", LOOPS[0] + [1], GREEDY)
    assert run_all(again) == run_all(ref)


class Fixed(Proposer):
    """Guesses the same tokens every time: right sometimes, wrong other times."""

    name = "fixed"

    def __init__(self, guess: list[int]) -> None:
        self.guess = guess

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.guess[:k] for k in ks]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_sampled_engine_output_follows_the_same_distribution(kind: str) -> None:
    """The distribution of the output tokens that can be guessed (the 2nd and 3rd), with and without
    guesses, over many unseeded samples of a tiny model."""
    model = tiny_model_of(kind, seed=2)
    params = SamplingParams(max_tokens=3, temperature=0.3, ignore_eos=True)
    n = 800

    def sample(eng) -> torch.Tensor:
        for i in range(n):
            eng.add_request(str(i), LOOPS[1], params)
        c = torch.zeros(2, 256)
        for toks in run_all(eng).values():
            c[0, toks[1]] += 1
            c[1, toks[2]] += 1
        return c / n

    off = sample(tiny_engine(model, seed=11, max_num_seqs=64, max_num_batched_tokens=512))
    eng = tiny_engine(
        model, speculative="ngram", spec_adaptive=False, seed=12, max_num_seqs=64, max_num_batched_tokens=512
    )
    # Guess each position's second most likely token: a verifier that accepts too often shows at once.
    eng.spec.proposer = Fixed([int(off[0].topk(2).indices[1]), int(off[1].topk(2).indices[1])])
    spec = sample(eng)
    assert eng.stats.spec_decode_num_accepted_tokens > n // 50
    assert eng.stats.spec_decode_num_draft_tokens > eng.stats.spec_decode_num_accepted_tokens
    assert ((off - spec).abs().sum(-1) / 2 < 0.08).all(), (off - spec).abs().sum(-1) / 2


class Behind(Fixed):
    """A draft model that has not seen `lag` tokens of every sequence."""

    def __init__(self, lag: int) -> None:
        super().__init__([7, 7, 7, 7])
        self._lag = lag
        self.seconds_per_catch_up_token = 1e-3

    def lag(self, seq: Sequence) -> int:
        return self._lag


def test_a_draft_that_must_catch_up_guesses_only_where_the_catch_up_pays() -> None:
    """Catching up on 500 tokens (0.5 s) stays within 10 % of 40 tokens' decoding only from 0.125 s a
    step (max_tokens 40, nothing generated yet)."""
    seq = seq_of([5, 6, 7] * 10)
    for lag, step_seconds, guesses in ((1, 0.01, True), (500, 0.01, False), (500, 0.2, True)):
        spec = SpecDecoder(Behind(lag), Controller(4))
        assert (spec.choose([(seq, 4)], threshold=0.1, step_seconds=step_seconds)[0] > 0) is guesses
    # Beside 7 other sequences, which all wait for it, the same catch-up costs 8 times as much.
    spec = SpecDecoder(Behind(500), Controller(4))
    assert spec.choose([(seq, 4)], threshold=0.1, step_seconds=0.2, num_seqs=8) == [0]
