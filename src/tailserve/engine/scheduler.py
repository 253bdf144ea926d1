"""Iteration-level batching: every step packs the running sequences plus chunks of waiting prompts
under one token budget, so a long prompt is prefilled a chunk at a time while others keep decoding.

When the KV pool runs dry, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later (its computed prefix usually comes back
from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tailserve.engine.block_manager import BlockManager
from tailserve.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens to run this step, starting at seq.num_computed


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens still to prefill for the queue: what a new request would wait behind."""
        return sum(s.num_uncomputed for s in self.waiting)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler and give its blocks back (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.table)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running sequences first: decodes and the rest of prompts already being prefilled.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_uncomputed
            if self.enable_chunked_prefill:
                n = min(n, budget)
            elif n > budget:
                i += 1
                continue
            while not self.bm.allocate(seq.table, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1

        # Then new prompts, first come first served, while nothing had to be preempted.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup(seq.token_ids) if seq.num_computed == 0 else []
            cached = len(hits) * self.bm.block_size
            n = seq.num_tokens - cached
            if not self.enable_chunked_prefill and n > budget:
                break
            n = min(n, budget)
            if not self.bm.allocate(seq.table, cached + n, hits):
                break
            self.waiting.popleft()
            self.bm.record_query(seq.num_tokens, cached)
            seq.num_computed = cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.table)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
