"""A request's end-to-end latency budget: one deadline, and a share of it for each stage.

The seeds' rule, "if the total budget is two seconds, assign hard caps to each stage", split in a
way that stays honest when stages run early or late: a stage's allowance is its weight's share of
what is *left* when it starts (among the stages still to come on its path), capped by the stage's own
hard cap, and never more than what is left. The split itself is a pure function of plain numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def allowance(remaining_s: float, weight: float, weight_left: float, cap_s: float | None = None) -> float:
    """A stage's allowance when it starts: its weight's share of the time left among the weights
    still ahead on its path (its own included), capped by `cap_s`; never negative."""
    if remaining_s <= 0:
        return 0.0
    share = remaining_s if weight_left <= 0 else remaining_s * min(1.0, weight / weight_left)
    return max(0.0, min(share, cap_s) if cap_s is not None else share)


@dataclass
class Budget:
    """One request's deadline. `remaining()` is what every LLM and tool call is given as its timeout.

    `clock` is injectable (tests use a fake one); it must be monotonic seconds."""

    total_s: float
    clock: Callable[[], float] = time.perf_counter
    start: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.clock()

    @property
    def deadline(self) -> float:
        return self.start + self.total_s

    def remaining(self) -> float:
        """Seconds until the deadline (0 once it passed)."""
        return max(0.0, self.deadline - self.clock())


def fit_tokens(remaining_s: float, first_token_s: float, s_per_token: float | None, wanted: int) -> int:
    """The most output tokens that still finish before the deadline: what is left after the expected
    first-token time, at the measured time per token, capped at `wanted` (all of it before any
    measurement). The "fewer max_tokens" degrade; 0 means not even one token fits."""
    if s_per_token is None or s_per_token <= 0:
        return wanted
    return max(0, min(wanted, int((remaining_s - first_token_s) / s_per_token)))
