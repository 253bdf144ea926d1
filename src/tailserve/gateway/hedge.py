"""Every attempt passes here: it is observed (TTFT per backend and model, prompt tokens outstanding and
prefill rate per backend: what hedging and degrade decide from), and, where the model has a `hedge`
policy, raced against a second attempt on another backend once it is late.

The race: the first attempt runs alone for the hedge delay (`routing.hedging`); if it has produced no
first byte by then, and the budget and the target's load allow, a second attempt starts on the
backend the chooser names with the first one excluded. The first to produce a byte wins; the other is
cancelled, which closes its upstream connection (a tailserve backend then frees its blocks) and
releases its lease as neutral. If one fails before the other answers, the other is awaited; if both
fail, the loop retries as for any failed attempt. Both are attempt spans of the request, the hedge
marked `tailserve.hedge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tailserve.gateway.policy_config import HedgeSpec
from tailserve.gateway.policy_metrics import PolicyMetrics
from tailserve.gateway.relay import Relay
from tailserve.gateway.upstream import Pool, Upstream
from tailserve.routing.degrade import CHARS_PER_TOKEN, PrefillMeter
from tailserve.routing.hedging import HedgeBudget, HedgePolicy, TtftWindow, hedge_delay, may_hedge_onto
from tailserve.routing.tiers import prompt_chars

R = TypeVar("R")
# (upstream, number, hedge) → the attempt's result: an Answer, a Relay, or a retry marker
RunOne = Callable[[Upstream, int, bool], Awaitable[Any]]


class Hedger:
    def __init__(self, specs: dict[str, HedgeSpec], metrics: PolicyMetrics) -> None:
        self.policies = {m: HedgePolicy(**s.model_dump()) for m, s in specs.items()}
        self.budgets = {m: HedgeBudget(p.max_share, p.window) for m, p in self.policies.items()}
        self.metrics = metrics
        self.ttft: dict[tuple[str, str, bool], TtftWindow] = {}  # (model, backend, stream)
        self.meters: dict[str, PrefillMeter] = {}  # by backend name

    def meter(self, backend: str) -> PrefillMeter:
        return self.meters.setdefault(backend, PrefillMeter())

    async def attempt(
        self,
        run_one: RunOne,
        pool: Pool,
        up: Upstream,
        call: Any,
        number: int,
        tried: set[str],
        is_retry: Callable[[Any], bool],
    ) -> Any:
        """One attempt of `call` on `up` (hedged where `pool` has a policy): its result, or the
        last failure when every attempt raced failed."""
        tokens = prompt_chars(call.body) / CHARS_PER_TOKEN
        policy = self.policies.get(pool.name)
        if policy is None:
            return await self._observed(run_one, pool, up, call, number, False, tokens, is_retry)
        first = asyncio.ensure_future(
            self._observed(run_one, pool, up, call, number, False, tokens, is_retry)
        )
        now = time.monotonic()
        self.budgets[pool.name].on_request(now)
        delay = hedge_delay(policy, self.ttft.get((pool.name, up.name, call.stream)))
        tasks = [first]
        result: Any = None
        try:
            if delay is None:
                result = await first
                return result
            done, _ = await asyncio.wait(tasks, timeout=max(0.0, min(delay, call.deadline - now)))
            if not done:
                second = self._hedge_target(policy, pool, up, call, tried)
                if second is not None:
                    self.metrics.hedges.labels(pool.name, "sent").inc()
                    tasks.append(
                        asyncio.ensure_future(
                            self._observed(run_one, pool, second, call, number, True, tokens, is_retry)
                        )
                    )
            result = await self._race(pool.name, tasks, is_retry)
            return result
        finally:
            await _cancel(tasks, keep=result)

    def _hedge_target(
        self, policy: HedgePolicy, pool: Pool, up: Upstream, call: Any, tried: set[str]
    ) -> Upstream | None:
        now = time.monotonic()
        if call.deadline <= now:
            return None
        target = pool.chooser.choose(call.key, now, tried | {up.name}, call.prompt)
        if target is None or target.name == up.name or target.name in tried:
            return None
        if not may_hedge_onto(policy, target.load) or not self.budgets[pool.name].try_hedge(now):
            return None
        tried.add(target.name)
        return pool.upstreams[target.name]

    async def _race(
        self, model: str, tasks: list[asyncio.Future[Any]], is_retry: Callable[[Any], bool]
    ) -> Any:
        pending, failed = set(tasks), None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            results = [(t, t.result()) for t in tasks if t in done]
            wins = [(t, r) for t, r in results if not is_retry(r)]
            failed = next((r for _, r in results if is_retry(r)), failed)
            if not wins:
                continue
            winner, result = wins[0]
            for _ in wins[1:]:  # both answered in the same turn: the other is closed unused (_cancel)
                self.metrics.hedges.labels(model, "cancelled").inc()
            if len(tasks) > 1:
                if winner is tasks[1]:
                    self.metrics.hedges.labels(model, "won").inc()
                if pending:
                    self.metrics.hedges.labels(model, "cancelled").inc()
            return result
        return failed

    async def _observed(
        self,
        run_one: RunOne,
        pool: Pool,
        up: Upstream,
        call: Any,
        number: int,
        hedge: bool,
        tokens: float,
        is_retry: Callable[[Any], bool],
    ) -> Any:
        meter = self.meter(up.name)
        ahead = meter.sent(tokens)
        start = time.monotonic()
        window = self.ttft.setdefault((pool.name, up.name, call.stream), TtftWindow())
        result = None
        try:
            result = await run_one(up, number, hedge)
            return result
        finally:
            elapsed = time.monotonic() - start
            meter.done(tokens)
            if result is None:  # cancelled before a byte: its TTFT is at least this (a censored sample)
                window.add(elapsed)
            elif not is_retry(result):
                window.add(elapsed)
                if isinstance(result, Relay):  # a stream's first byte is its first token, not its end
                    meter.first_token(ahead, elapsed)


async def _cancel(tasks: list[asyncio.Future[Any]], keep: Any) -> None:
    """Cancel and wait for what is still running (its `finally` closes its connection and lease), and
    close any stream that answered but is not `keep`, the one handed on."""
    for t in tasks:
        if not t.done():
            t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            r = await t
            if isinstance(r, Relay) and r is not keep:
                await r.close()
