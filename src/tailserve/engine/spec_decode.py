"""Speculative decoding: guess k tokens cheaply, check them all in one pass of the target model.

Proposers:
  ngram  prompt lookup: the continuation of the latest earlier occurrence of the sequence's last n
         tokens (n from `max_n` down to 1). Free to run; right when the output quotes its context.
  draft  a draft model run greedily: the target's own first `depth` layers with an int4 head
         (self-speculation), which shares the target's KV cache since layer i's keys and values never
         depend on the layers after it; or a separate model sharing the target's tokenizer, with a KV
         pool of its own indexed by the same block tables, which before guessing catches up on the
         tokens the target computed since its last pass.
Both propose greedily, i.e. a point-mass guess d per position.

Verification keeps the target's output exactly. Greedy rows accept the longest prefix of guesses
equal to the target's argmax and take the target's token at the first difference (or a bonus token
after the last guess); on the fused step every row's logits are bitwise those of plain decoding, so
greedy output is identical. Sampled rows use the rejection scheme for a point-mass proposal: accept d
with probability p(d), else draw from p with d removed; the output distribution is the target's.
Seeded sampled requests do not speculate: how many tokens a step guesses depends on load, and a seed
must give the same text whatever else runs.

Adaptive back-off (`Controller`): the i-th guess of a request pays off with probability αⁱ (α: its
acceptance rate, tracked per request) and costs the marginal time of one more token in the step. A
step of T tokens that emits N takes t ≈ a + b·T (the engine's step-time model, fitted on decode-sized
steps), so a guess is worth making only while αⁱ ≥ margin·(b + draft cost)·N/t: when decoding is
memory-bound (few sequences) guesses are nearly free, when it is compute-bound (many sequences) only
near-certain ones are, and a request whose guesses keep failing stops guessing for a while (doubling
each time). A new request starts from the proposer's acceptance over all requests, so a proposer that
fails on this traffic costs nothing but an occasional one-token probe. A separate draft's catch-up on
a request's unseen tokens holds up the whole step, so a request guesses only while that costs at most
a tenth of its remaining decode time, counted once per sequence of the step.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from tailserve.engine.block_manager import BlockManager
from tailserve.engine.sequence import Sequence
from tailserve.layers.sampler import draw, filter_top_k_top_p, softmax
from tailserve.sampling import SamplingParams

PROPOSERS = ("off", "ngram", "draft")


@dataclass
class SpecState:
    """One request's speculation record."""

    acceptance: float  # moving average of the share of guesses accepted
    proposed: int = 0
    accepted: int = 0
    pause_until: int = 0  # step before which the request does not guess
    pause: int = 0  # length of the last pause, doubled at each failure
    ngram_index: dict[tuple[int, ...], int] = field(default_factory=dict)
    ngram_indexed: int = 0  # tokens whose n-grams are in the index
    draft_computed: int = 0  # a separate draft model: tokens whose KV its pool holds
    draft_preemptions: int = 0  # the request's preemptions when that was counted (blocks since freed)


class Proposer(ABC):
    name: str
    seconds_per_guess = 0.0  # a model's time per guessed token (moving average; 0: no model)
    seconds_per_catch_up_token = 0.0  # a separate draft's time per token it catches up on

    @abstractmethod
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] guessed tokens following seqs[i]'s tokens (possibly none)."""

    def lag(self, seq: Sequence) -> int:
        """Tokens the proposer must run for `seq` before its first guess: 1 when it is in step."""
        return 1


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._one(s, k) for s, k in zip(seqs, ks)]

    def _one(self, seq: Sequence, k: int) -> list[int]:
        ids, state = seq.token_ids, seq.spec
        assert state is not None
        # Index every n-gram that ends before the last token: key → where its continuation starts.
        index = state.ngram_index
        for end in range(max(state.ngram_indexed, 1), len(ids)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index[tuple(ids[end - n : end])] = end
        state.ngram_indexed = max(len(ids), 1)
        for n in range(min(self.max_n, len(ids)), self.min_n - 1, -1):
            start = index.get(tuple(ids[len(ids) - n :]))
            if start is not None:
                return ids[start : start + k]
        return []


def _average(old: float, new: float) -> float:
    """A moving average of measured costs; the first measurement stands alone."""
    return new if old == 0.0 else 0.9 * old + 0.1 * new


class DraftProposer(Proposer):
    """A draft model run greedily k times over the speculating sequences (`runner`: the model and the
    KV pool it writes). depth: the target's first `depth` layers, whose KV is the target's own (the
    full pass rewrites it). Or a separate model with a pool of its own, which holds only what the draft
    computed: each sequence's first pass then also feeds it the tokens it has not seen (the prompt, the
    first time, less the leading blocks it computed for an earlier request with the same prefix).
    """

    name = "draft"

    def __init__(self, runner, depth: int | None = None, blocks: BlockManager | None = None) -> None:
        """blocks: the target's block manager, given for a separate draft (its own KV pool): the draft's
        KV of a prefix-cached block is reused as long as the block still holds that prefix."""
        self.runner, self.depth, self.blocks = runner, depth, blocks
        self._block_keys: dict[int, int] = {}  # block id → prefix key whose draft KV the pool holds

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        live = [i for i, k in enumerate(ks) if k > 0]
        step = 0
        while live:
            # Guess step `step` of every live sequence: its last token (then its previous guess) in,
            # after the tokens the draft has not seen yet.
            chunks = [[drafts[i][-1]] if step else self._unseen(seqs[i]) for i in live]
            starts = [seqs[i].num_computed + step + 1 - len(c) for i, c in zip(live, chunks)]
            t0 = time.perf_counter()
            logits = self.runner.run_chunks([seqs[i] for i in live], chunks, starts, self.depth)
            for i, t in zip(live, np.argmax(logits, axis=-1).tolist()):
                drafts[i].append(t)
            self._observe(time.perf_counter() - t0, len(live), sum(len(c) for c in chunks))
            step += 1
            live = [i for i in live if len(drafts[i]) < ks[i]]
        return drafts

    def _observe(self, seconds: float, guesses: int, tokens: int) -> None:
        """Costs, from a pass of `tokens` tokens that guessed `guesses`: a pass of one token per
        sequence prices a guess, a pass with catch-up chunks prices a caught-up token."""
        if tokens == guesses:
            self.seconds_per_guess = _average(self.seconds_per_guess, seconds / guesses)
        else:
            self.seconds_per_catch_up_token = _average(self.seconds_per_catch_up_token, seconds / tokens)

    def lag(self, seq: Sequence) -> int:
        if self.blocks is None:
            return 1
        state = seq.spec
        stale = state is None or state.draft_preemptions != seq.num_preemptions  # its blocks were freed
        seen = 0 if stale else min(state.draft_computed, seq.num_computed)
        if seen < seq.num_computed:  # leading blocks the draft computed for an earlier request
            table, bm, cached = seq.table, self.blocks, 0
            for bid, key in zip(table.blocks, table.keys):
                if self._block_keys.get(bid) != key or bm.blocks[bid].key != key:
                    break
                cached += bm.block_size
            seen = max(seen, min(cached, seq.num_computed))
        return seq.num_computed + 1 - seen

    def _unseen(self, seq: Sequence) -> list[int]:
        """The tokens up to and including the last one whose KV the draft still needs; marks them seen
        (guesses after them are not: a rejected guess's KV is garbage, an accepted one is recomputed)."""
        last, n = seq.num_computed, self.lag(seq)  # last: the last token's position
        first = last + 1 - n
        if self.blocks is not None:
            state = seq.spec
            assert state is not None
            state.draft_computed, state.draft_preemptions = last + 1, seq.num_preemptions
            start = first // self.blocks.block_size  # full blocks from here on: in the pool once this runs
            for bid, key in zip(seq.table.blocks[start:], seq.table.keys[start:]):
                self._block_keys[bid] = key
        return seq.token_ids[first : last + 1]


class Controller:
    """Chooses how many tokens each request guesses this step (see the module docstring)."""

    # A guess must promise this many times its estimated cost: the estimate leaves out the per-request
    # bookkeeping of checking guesses, and at the break-even point guessing only adds variance.
    MARGIN = 1.3
    PROBE_EVERY = 64  # steps between the chances a request below the floor gets to guess one token

    def __init__(
        self,
        max_k: int,
        adaptive: bool = True,
        prior: float = 0.7,
        decay: float = 0.8,
        floor: float = 0.15,
    ) -> None:
        self.max_k, self.adaptive, self.decay, self.floor = max_k, adaptive, decay, floor
        self.step = 0
        # The proposer's acceptance over all requests: where a new request starts, so short requests
        # do not each pay to learn that a proposer fails on this traffic.
        self.acceptance = prior

    def state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState(acceptance=self.acceptance)
        return seq.spec

    def threshold(
        self, coefficients: tuple[float, float] | None, num_tokens: int, num_seqs: int, guess_seconds: float
    ) -> float:
        """The least chance of acceptance a guess needs to pay for itself in this step (guess_seconds:
        the proposer's own time per guess)."""
        if coefficients is None:
            return 0.3  # until the step-time model knows the cost of a token
        a, b = coefficients
        step = a + b * num_tokens
        return self.MARGIN * (b + guess_seconds) * num_seqs / step

    def choose_k(self, seq: Sequence, threshold: float) -> int:
        state = self.state(seq)
        if not self.adaptive:
            return self.max_k
        if self.step < state.pause_until:
            return 0
        if state.acceptance < self.floor:  # learnt (or inherited) that guessing fails: probe now and then
            return 1 if self.step % self.PROBE_EVERY == 0 and threshold < 1.0 else 0
        if threshold >= 1.0:
            return 0
        if threshold <= 0.0:
            return self.max_k
        k = int(math.log(threshold) / math.log(state.acceptance)) if state.acceptance < 1.0 else self.max_k
        return max(0, min(self.max_k, k))

    def observe(self, seq: Sequence, proposed: int, accepted: int) -> None:
        state = self.state(seq)
        state.proposed += proposed
        state.accepted += accepted
        if proposed == 0:
            return
        rate = accepted / proposed
        self.acceptance = 0.95 * self.acceptance + 0.05 * rate
        state.acceptance = self.decay * state.acceptance + (1 - self.decay) * rate
        if state.acceptance < self.floor:
            # Stop guessing for a while; each failed comeback doubles the pause. A comeback starts
            # from the floor's level, so it guesses one token before it earns more.
            state.pause = min(max(2 * state.pause, 4), 256)
            state.pause_until = self.step + state.pause
            state.acceptance = self.floor * 1.5
        elif accepted == proposed:
            state.pause = 0


def speculation_allowed(seq: Sequence) -> bool:
    """Requests whose output must not depend on how many tokens a step guesses do not speculate, nor do
    constrained ones (guesses are not checked against the grammar)."""
    p = seq.params
    return (
        seq.grammar is None
        and (p.greedy or p.seed is None)
        and p.logprobs is None
        and seq.num_output_tokens >= p.min_tokens
        and seq.num_output_tokens >= 1
    )


def verify(
    logits: np.ndarray, draft: list[int], params: SamplingParams, generator: np.random.Generator
) -> tuple[list[int], int]:
    """(tokens to emit, how many guesses were accepted) from the target's logits at the k+1 positions
    ([k+1, vocab] float32): row i is the distribution after the row's token and the first i guesses."""
    if params.greedy:
        best = np.argmax(logits, axis=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return draft[:n] + [best[n]], n
    probs = softmax(filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p))
    for i, d in enumerate(draft):
        p = probs[i]
        if generator.random() < p[d]:
            continue
        rest = p.copy()
        rest[d] = 0.0
        return draft[:i] + [draw(rest, generator)], i
    return draft + [draw(probs[len(draft)], generator)], len(draft)


class SpecDecoder:
    """What the engine calls: `choose` and `propose` guesses before a step, `accept` checks them after."""

    def __init__(
        self, proposer: Proposer, controller: Controller, generator: np.random.Generator | None = None
    ) -> None:
        """generator: the draws of requests without a seed of their own (the engine's sampler's)."""
        self.proposer, self.controller = proposer, controller
        self.generator = generator if generator is not None else np.random.default_rng()
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verify_steps = 0  # (sequence, step) pairs that verified guesses

    # A separate draft model must first run a request's tokens it has not seen (its whole prompt, the
    # first time), while every sequence of the step waits: worth it only while that costs at most this
    # share of the request's remaining decode time.
    CATCH_UP_SHARE = 0.1

    def choose(
        self,
        candidates: list[tuple[Sequence, int]],
        threshold: float,
        step_seconds: float | None = None,
        num_seqs: int = 1,
    ) -> list[int]:
        """How many tokens each (sequence, most it may guess) decoding this step should guess.
        step_seconds: the expected time of this step (None while unknown); num_seqs: sequences in it."""
        c = self.controller
        c.step += 1
        ks = [min(cap, c.choose_k(seq, threshold)) for seq, cap in candidates]
        if c.adaptive and step_seconds:
            per_token = self.proposer.seconds_per_catch_up_token
            for i, (seq, _) in enumerate(candidates):
                lag = self.proposer.lag(seq) if ks[i] else 1
                budget = self.CATCH_UP_SHARE * (seq.params.max_tokens - seq.num_output_tokens) * step_seconds
                if lag > 1 and lag * per_token * num_seqs > budget:
                    ks[i] = 0
        return ks

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """The guesses (up to ks[i] each; the sequences' blocks must already hold them)."""
        return self.proposer.propose(seqs, ks)

    def accept(self, seq: Sequence, draft: list[int], logits: np.ndarray) -> tuple[list[int], int]:
        tokens, n = verify(logits, draft, seq.params, seq.generator or self.generator)
        self.controller.observe(seq, len(draft), n)
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += n
        self.num_verify_steps += 1
        return tokens, n
