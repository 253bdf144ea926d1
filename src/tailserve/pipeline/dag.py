"""Run a DAG of stages under one budget: independent stages concurrently (an asyncio TaskGroup),
each under its allowance, each overrun answered by its policy, the whole run never past the deadline.

A stage starts when every stage it comes `after` has finished. Its allowance is its weight's share of
the time left against the heaviest path of stages still ahead of it (`budget.allowance`), so early
stages cannot spend the time the answer needs. No stage's failure escapes: a timeout or exception
becomes its policy's value, and the stages after it see that value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from tailserve.pipeline.budget import Budget, allowance
from tailserve.pipeline.record import RequestRecord, StageRecord
from tailserve.pipeline.stage import (
    DeadlineExceeded,
    Degrade,
    Policy,
    Stage,
    StageContext,
    UseCached,
    UseDefault,
)


def path_weights(stages: Sequence[Stage], weight: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each stage's weight plus the heaviest chain of stages after it (the share it competes with).
    `weight` overrides the stages' own (the learned ones)."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError("stage names must be unique")
    children: dict[str, list[str]] = {s.name: [] for s in stages}
    for s in stages:
        for dep in s.after:
            if dep not in by_name:
                raise ValueError(f"stage {s.name!r} comes after unknown stage {dep!r}")
            children[dep].append(s.name)
    out: dict[str, float] = {}
    visiting: set[str] = set()

    def visit(name: str) -> float:
        if name in out:
            return out[name]
        if name in visiting:
            raise ValueError(f"the stages form a cycle through {name!r}")
        visiting.add(name)
        own = weight[name] if weight is not None else by_name[name].weight
        out[name] = own + max((visit(c) for c in children[name]), default=0.0)
        visiting.discard(name)
        return out[name]

    for s in stages:
        visit(s.name)
    return out


def _answer(policy: Policy, inputs: Mapping[str, Any]) -> tuple[Any, str]:
    """The value and outcome a non-running policy gives (Degrade's own variant is run by the caller)."""
    if isinstance(policy, UseCached):
        hit = policy.cache.get(policy.key(inputs), _NONE)
        return (policy.default, "default") if hit is _NONE else (hit, "cached")
    if isinstance(policy, UseDefault):
        return policy.value, "default"
    return None, "skipped"


_NONE = object()


def learn(typical: dict[str, float], rec: RequestRecord, rate: float) -> None:
    """Fold a request's stage times into `typical` (an exponential average of seconds per stage):
    every stage that ran counts, an overrun with the time it was cut at (a lower bound)."""
    for s in rec.stages:
        if s.error == "no_time":
            continue
        old = typical.get(s.name)
        typical[s.name] = s.elapsed_s if old is None else old + rate * (s.elapsed_s - old)


class Pipeline:
    """A fixed DAG of stages; `run` may be called for many requests, concurrently.

    With `learn_rate`, once every stage has run, the budget is split by each stage's typical time (an
    exponential average of what it took) instead of its configured weight, so the shares follow what
    the stages really cost on this machine and load; the weights are the prior until then."""

    def __init__(self, stages: Sequence[Stage], learn_rate: float | None = None) -> None:
        self.stages = list(stages)
        self.weights = path_weights(self.stages)
        self.learn_rate = learn_rate
        self.typical: dict[str, float] = {}

    def current_weights(self) -> tuple[dict[str, float], dict[str, float]]:
        """(each stage's own weight, its path weight) for a request starting now."""
        if self.learn_rate is None or len(self.typical) < len(self.stages):
            return {s.name: s.weight for s in self.stages}, self.weights
        return dict(self.typical), path_weights(self.stages, self.typical)

    async def run(
        self, budget: Budget, inputs: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], RequestRecord]:
        """Every stage's result (by name) and the request's record. `inputs` are visible to every
        stage beside its dependencies' results."""
        rec = RequestRecord(budget.total_s, budget.start)
        results: dict[str, Any] = dict(inputs or {})
        done = {s.name: asyncio.Event() for s in self.stages}
        own, path = self.current_weights()
        async with asyncio.TaskGroup() as tg:
            for s in self.stages:
                tg.create_task(self._stage(s, budget, results, done, rec, (own[s.name], path[s.name])))
        rec.end = budget.clock()
        if self.learn_rate is not None:
            learn(self.typical, rec, self.learn_rate)
        return results, rec

    async def _stage(
        self,
        s: Stage,
        budget: Budget,
        results: dict[str, Any],
        done: dict[str, asyncio.Event],
        rec: RequestRecord,
        weights: tuple[float, float],
    ) -> None:
        try:
            for dep in s.after:
                await done[dep].wait()
            results[s.name], record = await self._attempt(s, budget, results, *weights)
            rec.stages.append(record)
        finally:
            done[s.name].set()

    async def _attempt(
        self, s: Stage, budget: Budget, results: Mapping[str, Any], weight: float, weight_left: float
    ) -> tuple[Any, StageRecord]:
        clock = budget.clock
        start = clock()
        give = allowance(budget.remaining(), weight, weight_left, s.cap_s)
        ctx = StageContext(s.name, budget, give, start, results)
        error: str | None
        if give <= 0 or give < s.min_s:
            error = "no_time"
        else:
            try:
                async with asyncio.timeout(give):
                    value = await s.run(ctx)
            except TimeoutError:
                error = "timeout"
            except DeadlineExceeded:  # a call inside it was refused or cut for lack of time
                error = "deadline"
            except Exception as e:  # a failing stage is answered by its policy, like a slow one
                error = f"{type(e).__name__}: {e}"[:200]
            else:
                if isinstance(s.on_overrun, UseCached):
                    s.on_overrun.cache.put(s.on_overrun.key(results), value)
                return value, StageRecord(s.name, give, start, clock(), "ok", False, notes=tuple(ctx.notes))
        overrun = error in ("timeout", "deadline", "no_time")
        policy = s.on_overrun
        if isinstance(policy, Degrade):
            value, outcome = await self._degrade(policy, s.name, budget, results)
        else:
            value, outcome = _answer(policy, results)
        return value, StageRecord(s.name, give, start, clock(), outcome, overrun, error)

    @staticmethod
    async def _degrade(
        policy: Degrade, name: str, budget: Budget, results: Mapping[str, Any]
    ) -> tuple[Any, str]:
        grace = min(policy.grace_s, budget.remaining())
        if grace > 0:
            ctx = StageContext(name, budget, grace, budget.clock(), results, degraded=True)
            try:
                async with asyncio.timeout(grace):
                    return await policy.run(ctx), "degraded"
            except Exception:  # TimeoutError included: the cheaper variant failed too
                pass
        return _answer(policy.then, results)
