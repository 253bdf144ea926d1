"""The engine requests behind one HTTP request (prompts × n), merged into one stream of deltas."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tailserve.engine.async_engine import AsyncEngine
from tailserve.engine.outputs import RequestOutput
from tailserve.sampling import SamplingParams
from tailserve.server.admission import Ticket
from tailserve.structured.grammar import Grammar


@dataclass
class SubRequest:
    """One engine request: one prompt, one choice."""

    engine_id: str
    prompt_ids: list[int]
    params: SamplingParams
    grammar: Grammar | None = None  # compiled before the engine sees the request


class Generation:
    """The engine requests behind one HTTP request (prompts × n), merged into one stream of deltas.

    Every exit path ends in `aclose`, which aborts what is unfinished (freeing its KV blocks within one
    engine step) and releases the admission ticket exactly once.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        ticket: Ticket,
        subs: list[SubRequest],
        live: dict[str, Generation],
        *,
        priority: int,
        arrival: float,
        deadline: float | None,
    ) -> None:
        self.engine = engine
        self.ticket = ticket
        self.engine_ids = [s.engine_id for s in subs]
        self.deadline = deadline
        self.abort_reason: str | None = None
        self._gens = [
            engine.generate(
                s.prompt_ids,
                s.params,
                s.engine_id,
                priority=priority,
                arrival=arrival,
                deadline=deadline,
                grammar=s.grammar,
            )
            for s in subs
        ]
        self._iter: AsyncIterator[tuple[int, RequestOutput]] | None = None
        self.outputs: list[RequestOutput | None] = [None] * len(subs)  # each choice's latest delta
        self._live = live
        self._closed = False
        live.update(dict.fromkeys(self.engine_ids, self))

    def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The one stream of (sub-request index, delta); iterate it once."""
        assert self._iter is None
        self._iter = self._merge() if len(self._gens) > 1 else self._single()
        return self._iter

    async def _single(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        gen = self._gens[0]
        try:
            async for out in gen:
                self._track(0, out)
                yield 0, out
        finally:
            await gen.aclose()

    async def _merge(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self._gens)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                self._track(i, item)
                remaining -= item.finished
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in self._gens:
                await g.aclose()  # type: ignore[attr-defined]

    def _track(self, i: int, out: RequestOutput) -> None:
        self.outputs[i] = out
        if out.finished:
            self.ticket.finished(i)
        else:
            self.ticket.started(i)

    def timed_out(self, out: RequestOutput) -> bool:
        return (
            out.finish_reason == "abort"
            and self.deadline is not None
            and time.perf_counter() >= self.deadline
        )

    def abort(self, reason: str) -> None:
        """End every choice now (graceful shutdown past its grace period)."""
        self.abort_reason = reason
        for eid in self.engine_ids:
            self.engine.abort(eid)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._iter is not None:
                with contextlib.suppress(RuntimeError):  # still running in a task being cancelled
                    await self._iter.aclose()  # type: ignore[attr-defined]
            else:
                for g in self._gens:
                    await g.aclose()  # type: ignore[attr-defined]
        finally:
            if not self.ticket.done:
                for eid in self.engine_ids:
                    self.engine.abort(eid)
            self.ticket.release()
            for eid in self.engine_ids:
                self._live.pop(eid, None)
