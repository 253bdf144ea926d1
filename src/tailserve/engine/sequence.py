"""One request's state: its tokens, how many have KV computed, its blocks, and where it is in its life.

WAITING ──schedule──▶ RUNNING ──stop/length──▶ FINISHED
   ▲                     │ └──abort/deadline/error──▶ FINISHED
   └──preempt (recompute)┘
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailserve.engine.block_manager import BlockTable
from tailserve.engine.outputs import RequestTimes, TokenLogprob
from tailserve.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first, as in vLLM
    deadline: float | None = None  # perf_counter time after which the request is aborted
    arrival_order: int = 0
    arrival_pass: int = 0  # the scheduling pass it arrived before (scheduler.py orders by it)
    times: RequestTimes = field(default_factory=RequestTimes)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    prefix_hint: int = 0  # while waiting: tokens the prefix cache held at the last lookup (scheduling)
    table: BlockTable = field(default_factory=BlockTable)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    generator: np.random.Generator | None = None  # a seeded request's own: its draws alone
    detokenizer: Any = None  # IncrementalDetokenizer; typed loosely to keep this module torch-light
    pending_text: str = ""
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    spec: Any = None  # spec_decode.SpecState once the request has speculated
    grammar: Any = None  # structured.Matcher: the output is constrained to its grammar

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = np.random.default_rng(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
