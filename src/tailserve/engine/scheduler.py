"""Iteration-level batching: every step packs the running sequences plus chunks of waiting prompts
under one token budget, so a long prompt is prefilled a chunk at a time while others keep decoding.

Order: decodes first (one token each, most urgent first); then prompt work. Urgency is the request's
priority (lower first) improved by one level per `priority_aging` seconds of waiting, so nothing
starves. With length-aware lanes, a prompt with more than `long_prefill_threshold` tokens left is
"long": short prompts go ahead of long ones at equal priority, and long ones get at most the budget
the short ones leave, but never less than a quarter of it, so a straggler neither stalls the short
requests' first tokens nor starves itself. Within a lane, prompts go first come, first served by the
scheduling pass they arrived before, and the shortest first among those that arrived together: a
prompt waits only behind what was queued before it (first come, first served bounds the worst wait,
which is what p99 TTFT measures), while a burst still gets its quick prompts out first.

When the KV pool runs dry, the least urgent running sequence (lowest priority, newest) is preempted:
its blocks are freed and it goes back to the queue to be recomputed later (its computed prefix
usually comes back from the prefix cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tailserve.engine.block_manager import BlockManager, PartialHit
from tailserve.engine.sequence import Sequence, Status

LONG_PROMPT_TOKENS = 256  # the least default threshold of the long lane


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens to run this step, starting at seq.num_computed
    draft: list[int] = field(default_factory=list)  # guessed tokens run after them (spec_decode.py)
    # seq.num_computed when scheduled: a failed step that left it there may be rerun (engine/faults.py)
    start: int = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed

    @property
    def token_ids(self) -> list[int]:
        """Every token this step runs for the sequence: its new tokens, then the guesses."""
        start = self.seq.num_computed
        return self.seq.token_ids[start : start + self.num_new_tokens] + self.draft


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # (source, destination) blocks whose KV to copy before the step writes any, every source read
    # before any destination is written: partial prefix hits (block_manager.lookup_partial). A source
    # taken as a fresh block in this same pass still holds its KV then, so nothing needs pinning.
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + len(s.draft) for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        length_aware: bool = True,
        long_prefill_threshold: int | None = None,
        priority_aging: float = 2.0,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.length_aware = length_aware
        # "Long" is absolute, not a share of the budget: with a small budget, half of it would put
        # ordinary chat turns in the long lane, behind the very prompts the lanes shield them from.
        self.long_threshold = long_prefill_threshold or max(max_num_batched_tokens // 2, LONG_PROMPT_TOKENS)
        self.long_min_share = max(max_num_batched_tokens // 4, 1)
        self.priority_aging = priority_aging
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_passes = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        seq.arrival_pass = self.num_passes
        seq.prefix_hint = len(self.bm.lookup(seq.token_ids)) * self.bm.block_size
        self.waiting.append(seq)

    @staticmethod
    def _work(seq: Sequence) -> int:
        """Prompt tokens left to compute; for a waiting request, less what the prefix cache held when
        last looked up (a chat turn behind a cached system prompt is short work, not a long prompt)."""
        return seq.num_uncomputed - (seq.prefix_hint if seq.status is Status.WAITING else 0)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens still to prefill for the queue: what a new request would wait behind."""
        return sum(self._work(s) for s in self.waiting)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and give its blocks back (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give a sequence's blocks back, its computed tail indexed for whatever re-sends it."""
        self.bm.register_tail(seq.table, seq.token_ids, seq.num_computed)
        self.bm.free(seq.table)

    # --- ordering ---------------------------------------------------------------------------------

    def _urgency(self, seq: Sequence, now: float) -> tuple[float, int]:
        waited = now - seq.times.arrival
        aged = seq.priority - (waited / self.priority_aging if self.priority_aging > 0 else 0.0)
        return (aged, seq.arrival_order)

    def _lane(self, seq: Sequence) -> int:
        return int(self.length_aware and self._work(seq) > self.long_threshold)

    def _prefill_key(self, seq: Sequence, now: float) -> tuple[int, int, int, int, int]:
        """Priority aged in whole levels, then lane, then the pass the request arrived before, then the
        shortest remaining prompt, then arrival. Shortest-first across passes would let a stream of
        short newcomers starve a slightly longer prompt for many steps (it did: the chat workload's
        worst TTFT at 16 streams was such a prompt, at 3x its neighbours'); among prompts that arrived
        together it only reorders work that all waits anyway, and lowers the mean."""
        if not self.length_aware:
            return (0, 0, 0, 0, seq.arrival_order)  # first come, first served
        waited = now - seq.times.arrival
        level = seq.priority - (int(waited / self.priority_aging) if self.priority_aging > 0 else 0)
        return (level, self._lane(seq), seq.arrival_pass, self._work(seq), seq.arrival_order)

    # --- the step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.num_passes += 1
        now = time.perf_counter()
        budget = self.max_num_batched_tokens

        # 1. Every running sequence that is decoding advances by one token.
        for seq in sorted(self.running, key=lambda s: self._urgency(s, now)):
            if (
                seq.num_uncomputed == 1
                and seq.status is Status.RUNNING
                and budget > 0
                and self._grow(seq, 1, out, now)
            ):
                budget -= 1

        # 2. Prompt work: prompts being prefilled and waiting ones, by priority, then lane, then age.
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        candidates = sorted(prefills + self.waiting, key=lambda s: self._prefill_key(s, now))
        long_cap = budget
        reserve = 0  # held back from short prompts for the long lane's floor, until a long one runs
        if self.length_aware:
            short_demand = sum(self._work(s) for s in candidates if self._lane(s) == 0)
            long_cap = max(budget - short_demand, self.long_min_share)
            if any(self._lane(s) for s in candidates):
                reserve = min(self.long_min_share, budget)
        prefilled = False
        for seq in candidates:
            if budget <= 0:
                break
            n = seq.num_uncomputed
            hits: list[int] = []
            partial = None
            if seq.status is Status.WAITING:
                if out.preempted or len(self.running) >= self.max_num_seqs:
                    continue  # no new work while the pool is short or every slot is taken
                hits = self.bm.lookup(seq.token_ids)
                seq.prefix_hint = len(hits) * self.bm.block_size
                partial = self.bm.lookup_partial(seq.token_ids, hits)
                n -= seq.prefix_hint + (partial.num_tokens if partial else 0)
            long = self.length_aware and n > self.long_threshold
            if self.enable_chunked_prefill:
                n = min(n, budget, long_cap) if long else min(n, budget - reserve)
            elif n > budget and prefilled:
                continue  # unchunked: a whole prompt, alone if it exceeds the budget
            if n <= 0:
                continue
            if seq.status is Status.WAITING:
                if not self._admit(seq, hits, partial, n, out):
                    continue
            elif not self._grow(seq, n, out, now):
                continue
            budget -= n
            prefilled = True
            if long:
                long_cap -= n
                reserve = 0
        return out

    def _grow(self, seq: Sequence, n: int, out: SchedulerOutput, now: float) -> bool:
        """Schedule n more tokens of a running sequence, preempting less urgent ones for room.

        Only sequences not yet scheduled this step can be victims (and `seq` itself, last).
        """
        while not self.bm.allocate(seq.table, seq.num_computed + n):
            taken = {id(s.seq) for s in out.scheduled}
            victims = [s for s in self.running if id(s) not in taken]
            victim = max(victims, key=lambda s: self._urgency(s, now))
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        out.scheduled.append(ScheduledSeq(seq, n))
        return True

    def _admit(
        self, seq: Sequence, hits: list[int], partial: PartialHit | None, n: int, out: SchedulerOutput
    ) -> bool:
        cached = len(hits) * self.bm.block_size + (partial.num_tokens if partial else 0)
        if not self.bm.allocate(seq.table, cached + n, hits):
            return False
        if partial:
            out.copies.append((partial.block_id, seq.table.blocks[len(hits)]))
        self.waiting.remove(seq)
        self.bm.record_query(seq.num_tokens, cached)
        seq.num_computed = cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached
        seq.status = Status.RUNNING
        self.running.append(seq)
        out.scheduled.append(ScheduledSeq(seq, n))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.append(seq)
