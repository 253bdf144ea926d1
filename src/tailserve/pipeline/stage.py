"""Stages and what happens when one overruns its allowance.

A stage is an async function of a `StageContext` (its allowance, the request's budget, the results
of the stages it depends on). When it runs out of time, or fails, or cannot even start because its
allowance is below its `min_s`, its overrun policy decides the result instead: skip it, use a
default, use the last good value from a cache, or run a cheaper variant (smaller retrieval fan-out,
the small model tier, fewer max_tokens) in a short grace period.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailserve.pipeline.budget import Budget
from tailserve.pipeline.cache import TTLCache


class DeadlineExceeded(Exception):
    """A call could not finish within the time it was given (raised by clients; treated as overrun)."""


@dataclass
class StageContext:
    """What a stage function sees. `remaining()` is the time it may still use: its allowance or the
    request's deadline, whichever comes first; pass it to every LLM and tool call."""

    name: str
    budget: Budget
    allowance_s: float
    started: float
    inputs: Mapping[str, Any]
    degraded: bool = False
    notes: list[str] = field(default_factory=list)  # degrades a stage chose itself ("fewer_tokens")

    def remaining(self) -> float:
        stage_left = self.started + self.allowance_s - self.budget.clock()
        return max(0.0, min(stage_left, self.budget.remaining()))


StageFn = Callable[[StageContext], Awaitable[Any]]


@dataclass(frozen=True)
class Skip:
    """Drop the stage: its result is None and the stages after it go on without it."""


@dataclass(frozen=True)
class UseDefault:
    value: Any


@dataclass(frozen=True)
class UseCached:
    """Every good result is stored under `key(inputs)`; an overrun answers the stored one, if any,
    else `default`. For slowly changing data (a user's profile, a policy document)."""

    cache: TTLCache
    key: Callable[[Mapping[str, Any]], Hashable]
    default: Any = None


@dataclass(frozen=True)
class Degrade:
    """Run `run` (the cheaper variant) for at most `grace_s`; if that also fails, apply `then`."""

    run: StageFn
    grace_s: float
    then: Skip | UseDefault = field(default_factory=Skip)


Policy = Skip | UseDefault | UseCached | Degrade


@dataclass(frozen=True)
class Stage:
    """One node of the DAG. `weight` is its share of the budget against the stages after it on its
    path; `cap_s` a hard cap whatever the budget; below `min_s` of allowance it does not start."""

    name: str
    run: StageFn
    after: tuple[str, ...] = ()
    weight: float = 1.0
    cap_s: float | None = None
    min_s: float = 0.0
    on_overrun: Policy = field(default_factory=Skip)
