"""LLMEngine: the step loop (schedule → run → sample → update), and the choice of model path at start.
AsyncEngine (async_engine.py) runs it on its own thread; StepTimeModel (step_time.py) prices steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tailserve.config import EngineConfig
from tailserve.engine.faults import rerun_alone
from tailserve.engine.masks import GrammarMasks
from tailserve.engine.model_runner import ModelRunner, kv_bytes_per_block, make_runner, pools_for
from tailserve.engine.outputs import RequestOutput, TokenLogprob
from tailserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from tailserve.engine.sequence import Sequence, Status
from tailserve.engine.spec_decode import (
    PROPOSERS,
    Controller,
    DraftProposer,
    NgramProposer,
    SpecDecoder,
    speculation_allowed,
)
from tailserve.engine.step_time import StepTimeModel
from tailserve.layers import kernels
from tailserve.layers.sampler import Sampler, SampleRow
from tailserve.models.fused import FusedLlama
from tailserve.sampling import SamplingParams
from tailserve.structured.grammar import Grammar

if TYPE_CHECKING:  # the PyTorch model: imported only where it is served (engine/load.py)
    from tailserve.models.llama import LlamaModel

log = logging.getLogger("tailserve.engine")


@dataclass
class EngineStats:
    """A consistent snapshot, replaced whole after each step, that other threads may read freely."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    prefill_tokens_per_s: float = 0.0  # rate through full-budget steps, from the fitted step-time model
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_evictions: int = 0
    last_step_time: float = 0.0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    num_steps: int = 0  # steps run so far; a new value means the last_* fields describe a new step
    spec_proposer: str = "off"
    cpu_tier: str = "none"  # the tier the fused step's kernels run at (layers/kernels.py); none: PyTorch
    spec_decode_num_draft_tokens: int = 0  # guesses proposed
    spec_decode_num_accepted_tokens: int = 0  # guesses the target confirmed
    spec_decode_num_verify_steps: int = 0  # (request, step) pairs that checked guesses


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: FusedLlama | LlamaModel,
        tokenizer=None,
        draft: FusedLlama | None = None,
    ) -> None:
        """Build from a loaded model; `from_config` loads one. tokenizer may be None (token ids only).
        draft: a separate draft model for `speculative="draft"` (`from_config` loads `draft_model` when
        it names a model), sharing the target's vocabulary; it gets a KV pool of its own."""
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        longest = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        plan = pools_for(model, config, longest)  # one KV pool, or two (kv_pools.py)
        num_blocks = plan.num_blocks
        self.max_model_len = min(longest, plan.max_tokens)
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs so every running sequence can decode"
            )
        self.block_manager = plan.block_manager(config.block_size, config.prefix_cache)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            enable_chunked_prefill=config.chunked_prefill,
            length_aware=config.length_aware,
            long_prefill_threshold=config.long_prefill_threshold,
            priority_aging=config.priority_aging,
        )
        self.runner = make_runner(model, num_blocks, config.block_size, plan.sliding_blocks)
        self.sampler = Sampler(config.seed)
        # A model may pad its vocabulary past the tokenizer's: those ids must never be sampled.
        self.num_sampleable = min(mc.vocab_size, getattr(tokenizer, "vocab_size", mc.vocab_size))
        eos = set(getattr(tokenizer, "eos_token_ids", None) or mc.eos_token_ids)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.requests: dict[str, Sequence] = {}
        self._order = itertools.count()
        self.step_times = StepTimeModel()
        self.decode_step_times = StepTimeModel()  # steps with no prompt work: what a guess costs
        self.spec = self._make_spec_decoder(config, draft, num_blocks)
        self.masks = GrammarMasks(self.num_sampleable)  # constrained rows' token masks (masks.py)
        self.stats = EngineStats(
            num_free_blocks=num_blocks,
            num_total_blocks=num_blocks,
            spec_proposer=config.speculative,
            cpu_tier=(model.tier or kernels.active_tier() or "none")
            if isinstance(model, FusedLlama)
            else "none",
        )

    def _make_spec_decoder(
        self, config: EngineConfig, draft: FusedLlama | None, num_blocks: int
    ) -> SpecDecoder | None:
        if config.speculative not in PROPOSERS:
            raise ValueError(f"unknown speculative {config.speculative!r}; use one of {', '.join(PROPOSERS)}")
        if config.speculative == "off":
            return None
        if config.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1")
        controller = Controller(config.num_speculative_tokens, adaptive=config.spec_adaptive)
        rng = self.sampler.generator  # unseeded requests' draws come from the engine's seed either way
        if config.speculative == "ngram":
            return SpecDecoder(NgramProposer(), controller, rng)
        if not isinstance(self.model, FusedLlama):
            raise ValueError("draft speculation runs on the fused C++ step (CPU, bf16)")
        if draft is not None:
            if not isinstance(draft, FusedLlama):
                raise ValueError("a draft model runs on the fused C++ step too")
            if draft.config.vocab_size != self.model.config.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the "
                    f"target's ({self.model.config.vocab_size})"
                )
            pool = ModelRunner(draft, num_blocks, config.block_size)
            log.info(
                "draft model: %d layers, KV pool %.0f MiB beside the target's",
                draft.config.num_layers,
                num_blocks * kv_bytes_per_block(draft, config.block_size) / (1 << 20),
            )
            return SpecDecoder(DraftProposer(pool, blocks=self.block_manager), controller, rng)
        layers = self.model.config.num_layers
        spec = config.draft_model or f"layers:{max(1, layers // 4)}"
        kind, _, n = spec.partition(":")
        if kind != "layers" or not n.isdigit() or not 1 <= int(n) < layers:
            raise ValueError(
                f"draft model {spec!r}: give layers:N, the target's first N layers (1 <= N < {layers}), "
                "or a model that shares the target's tokenizer (loaded by LLMEngine.from_config)"
            )
        return SpecDecoder(DraftProposer(self.runner, depth=int(n)), controller, rng)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model `config` names (engine/load.py: the start's phases, caches, and path choice)."""
        from tailserve.engine.load import load_engine

        return load_engine(config)

    # --- requests ---------------------------------------------------------------------------------

    def make_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival: float | None = None,
        deadline: float | None = None,
        grammar: Grammar | None = None,
    ) -> Sequence:
        """Validate and tokenize a request without touching engine state (safe from any thread).
        grammar: a compiled grammar (structured/) the output must follow."""
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompt token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the request asks for "
                f"{len(ids) + params.max_tokens} ({len(ids)} in the prompt + {params.max_tokens} max_tokens)"
            )
        seq = Sequence(request_id, ids, params, priority=priority, deadline=deadline)
        if grammar is not None:
            seq.grammar = grammar.matcher()
        if arrival is not None:
            seq.times.arrival = arrival
        if self.tokenizer is not None:
            from tailserve.tokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop
            )
        elif params.stop:
            raise ValueError("stop strings need a tokenizer")
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        seq.arrival_order = next(self._order)
        if seq.times.admitted is None:
            seq.times.admitted = time.perf_counter()
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, **kw) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params, **kw)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """Stop a request now and give back its blocks; the returned delta is its last."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, reason, error=error)
        self._snapshot()
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: every running sequence advances by its scheduled tokens."""
        outputs = self._expire_deadlines()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.copies:  # partial prefix hits, before anything of this step writes KV (never redone)
            self.runner.copy_blocks(sched.copies)
        if sched.scheduled:
            try:
                self._run(sched, t0)
            except Exception as e:  # only the requests that fail alone end (faults.py)
                rerun_alone(self, sched, e)
        for s in sched.scheduled:
            seq = s.seq
            if seq.pending_tokens or seq.finished:
                outputs.append(self._output(seq))
        self._snapshot(sched, time.perf_counter() - t0)
        return outputs

    def _run(self, sched: SchedulerOutput, t0: float) -> None:
        now = t0
        for s in sched.scheduled:
            if s.seq.times.first_scheduled is None:
                s.seq.times.first_scheduled = now
        drafting = 0.0  # the proposer's time: priced apart from the target's (spec_decode.Controller)
        if self.spec is not None:
            planned = time.perf_counter()
            self._plan_guesses(sched)
            drafting = time.perf_counter() - planned
        masks = self.masks.start(sched.scheduled)
        result = self.runner.run(sched.scheduled)
        logits = result.logits[:, : self.num_sampleable]
        plain = [j for j, s in enumerate(result.sampled) if not s.draft]
        rows = [
            SampleRow(s.seq.params, s.seq.generator, self._banned(s.seq))
            for s in map(result.sampled.__getitem__, plain)
        ]
        plain_rows = [result.rows[j] for j in plain]
        # Guesses' rows lie in between only when some request guessed: then gather the others.
        logits_plain = logits if plain_rows == list(range(len(logits))) else logits[plain_rows]
        plain_seqs = [result.sampled[j].seq for j in plain]
        sample = self.masks.sample(self.sampler, logits_plain, plain_seqs, rows, masks) if rows else None
        now = time.perf_counter()
        for s in sched.scheduled:
            if not s.draft:
                s.seq.num_computed += s.num_new_tokens
                self.block_manager.register_full_blocks(s.seq.table, s.seq.token_ids, s.seq.num_computed)
        for i, j in enumerate(plain):
            assert sample is not None
            self._append(result.sampled[j].seq, sample.token_ids[i], sample.logprobs[i], now)
        self.masks.prefetch(plain_seqs)
        for j, s in enumerate(result.sampled):
            if s.draft:
                self._check_guesses(s, logits[result.rows[j] : result.rows[j] + 1 + len(s.draft)], now)
        self.step_times.observe(sched.num_tokens, now - t0)
        if all(s.num_new_tokens == 1 for s in sched.scheduled):
            self.decode_step_times.observe(sched.num_tokens, now - t0 - drafting)

    def _plan_guesses(self, sched: SchedulerOutput) -> None:
        """Let decoding requests guess tokens to verify in this step, where guessing pays (spec_decode.py)."""
        assert self.spec is not None
        bm = self.block_manager
        room = self.config.max_num_batched_tokens - sched.num_tokens
        candidates: list[tuple[ScheduledSeq, int]] = []
        for s in sched.scheduled:
            seq = s.seq
            if s.num_new_tokens != 1 or seq.num_uncomputed != 1 or not speculation_allowed(seq):
                continue
            cap = min(
                self.spec.controller.max_k,
                seq.params.max_tokens - seq.num_output_tokens - 1,
                self.max_model_len - seq.num_tokens,
            )
            if cap > 0:
                candidates.append((s, cap))
        if not candidates:
            return
        threshold = self.spec.controller.threshold(
            self.decode_step_times.coefficients(),
            sched.num_tokens,
            len(sched.scheduled),
            self.spec.proposer.seconds_per_guess,
        )
        step_seconds = self.decode_step_times.seconds(sched.num_tokens)
        ks = self.spec.choose(
            [(s.seq, cap) for s, cap in candidates], threshold, step_seconds, len(sched.scheduled)
        )
        guessing: list[tuple[ScheduledSeq, int]] = []
        for (s, _), k in zip(candidates, ks):
            k = min(k, room)
            # Room in the pool for the guesses' KV (a draft model writes it while guessing).
            while k > 0 and not bm.allocate(s.seq.table, s.seq.num_tokens + k):
                k -= 1
            if k > 0:
                guessing.append((s, k))
                room -= k
        if not guessing:
            return
        drafts = self.spec.propose([s.seq for s, _ in guessing], [k for _, k in guessing])
        for (s, _), draft in zip(guessing, drafts):
            s.draft = draft
            bm.trim(s.seq.table, s.seq.num_tokens + len(draft))

    def _check_guesses(self, s: ScheduledSeq, logits: np.ndarray, now: float) -> None:
        """Keep the confirmed guesses' KV, emit them and the target's own next token, drop the rest."""
        assert self.spec is not None
        seq = s.seq
        tokens, accepted = self.spec.accept(seq, s.draft, logits)
        seq.num_computed += 1 + accepted
        self.block_manager.register_full_blocks(
            seq.table, seq.token_ids + tokens[:accepted], seq.num_computed
        )
        for token in tokens:
            self._append(seq, token, None, now)
            if seq.finished:
                return
        self.block_manager.trim(seq.table, seq.num_tokens)

    def _banned(self, seq: Sequence) -> list[int]:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        banned = list(p.stop_token_ids)
        if not p.ignore_eos:
            banned.extend(self.eos_token_ids)
        return banned

    def _append(self, seq: Sequence, token: int, logprob, now: float) -> None:
        try:
            seq.token_ids.append(token)
            times = seq.times
            if times.first_token is None:
                times.first_token = now
            times.last_token = now
            times.token_times.append(now)
            seq.pending_tokens.append(token)
            if seq.detokenizer is not None:
                seq.pending_text += seq.detokenizer.add(token)
            if logprob is not None:
                seq.pending_logprobs.append(self._token_logprob(token, logprob))
            if seq.grammar is not None and not seq.grammar.accept(token):
                self._finish(seq, "error", error=f"the grammar rejected token {token}: {seq.grammar.error}")
                return
            self._check_stop(seq, token)
            if seq.grammar is not None and not seq.finished and seq.grammar.done:
                self._finish(seq, "stop")  # complete, whatever ignore_eos says: nothing more may follow
        except Exception as e:
            log.exception("request %s failed", seq.request_id)
            self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _token_logprob(self, token: int, logprob: tuple[float, list[tuple[int, float]]]) -> TokenLogprob:
        piece = self.tokenizer.id_to_piece if self.tokenizer is not None else str
        lp, top = logprob
        return TokenLogprob(token, piece(token), lp, [(t, piece(t), v) for t, v in top])

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params  # before min_tokens, end tokens were never sampled (see _banned)
        if not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop")
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", stop_reason=token)
        elif seq.detokenizer is not None and seq.detokenizer.stop_hit is not None:
            self._finish(seq, "stop", stop_reason=seq.detokenizer.stop_hit)
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(
        self, seq: Sequence, reason: str, *, stop_reason: str | int | None = None, error: str | None = None
    ) -> None:
        if seq.finished:
            return
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason, seq.error = reason, stop_reason, error
        seq.times.finished = time.perf_counter()
        if seq.detokenizer is not None and reason != "error":
            seq.pending_text += seq.detokenizer.flush()
        self.requests.pop(seq.request_id, None)

    def _expire_deadlines(self) -> list[RequestOutput]:
        now = time.perf_counter()
        late = [s for s in self.requests.values() if s.deadline is not None and now > s.deadline]
        outs = []
        for seq in late:
            self._finish(seq, "abort", error="deadline exceeded: the request ran past its timeout")
            outs.append(self._output(seq))
        return outs

    def _output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=seq.pending_tokens,
            new_text=seq.pending_text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            times=seq.times,
        )
        seq.pending_tokens, seq.pending_text, seq.pending_logprobs = [], "", []
        return out

    def _snapshot(self, sched: SchedulerOutput | None = None, elapsed: float | None = None) -> None:
        """Publish fresh stats; without a step (after an abort) the last step's figures are kept."""
        bm = self.block_manager
        last = self.stats
        self.stats = EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_tokens=self.scheduler.num_waiting_tokens,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
            prefill_tokens_per_s=self.step_times.rate(self.config.max_num_batched_tokens),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prefix_cache_evictions=bm.evictions,
            last_step_time=last.last_step_time if elapsed is None else elapsed,
            last_batch_size=last.last_batch_size if sched is None else len(sched.scheduled),
            last_batch_tokens=last.last_batch_tokens if sched is None else sched.num_tokens,
            num_steps=last.num_steps + (sched is not None),
            spec_proposer=last.spec_proposer,
            cpu_tier=last.cpu_tier,
            spec_decode_num_draft_tokens=self.spec.num_draft_tokens if self.spec else 0,
            spec_decode_num_accepted_tokens=self.spec.num_accepted_tokens if self.spec else 0,
            spec_decode_num_verify_steps=self.spec.num_verify_steps if self.spec else 0,
        )
