"""AsyncEngine: the LLMEngine's step loop on its own thread, with async streams of deltas and aborts, so
HTTP never waits on a model step nor the other way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from tailserve.config import EngineConfig
from tailserve.engine.engine import EngineStats, LLMEngine
from tailserve.engine.outputs import RequestOutput
from tailserve.engine.sequence import Sequence, Status
from tailserve.sampling import SamplingParams
from tailserve.structured.grammar import Grammar, GrammarCompiler, GrammarError, GrammarSpec, Vocabulary

log = logging.getLogger("tailserve.engine")


class AsyncEngine:
    """Runs an LLMEngine on a dedicated thread; callers get async streams of RequestOutput deltas."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        # Ids the engine still holds (queued, running, or aborted but not yet reported). A new request
        # may not reuse one: the old request's last delta would be routed to it.
        self._live: set[str] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tailserve-engine", daemon=True)
        self.step_hooks: list[Callable[[LLMEngine, list[RequestOutput]], None]] = []
        self._grammars: GrammarCompiler | None = None
        if engine.tokenizer is not None:
            # The vocabulary is prepared in the background from the start (~0.5 s), not by a request.
            with contextlib.suppress(GrammarError):  # the structured extra is not installed
                self._grammars = self._grammar_compiler()
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine.from_config(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        arrival: float | None = None,
        deadline: float | None = None,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; raises ValueError before queueing on bad input. A grammar comes
        compiled (`compile_grammar`), so the engine never holds a step for one.

        Leaving the iteration early (client gone, task cancelled) aborts the request in the engine.
        """
        seq = self.engine.make_sequence(
            request_id, prompt, params, priority=priority, arrival=arrival, deadline=deadline, grammar=grammar
        )
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._live.add(request_id)
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        # Admitted now: the wait for the engine thread to pick it up (a step in flight) is queue time.
        seq.times.admitted = time.perf_counter()
        self._send("add", seq)
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def compile_grammar(self, spec: GrammarSpec) -> Grammar:
        """The spec compiled on the grammar threads (cached); GrammarError says why it cannot be."""
        if self._grammars is None:
            if self.engine.tokenizer is None:
                raise GrammarError("structured outputs need a tokenizer")
            self._grammars = self._grammar_compiler()
        return await self._grammars.compile_async(spec)

    def _grammar_compiler(self) -> GrammarCompiler:
        tokenizer = self.engine.tokenizer
        return GrammarCompiler(
            lambda: Vocabulary.of_tokenizer(tokenizer), timeout=self.engine.config.grammar_timeout
        )

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self._grammars is not None:
            self._grammars.shutdown()

    def _send(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _drain_inbox(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return outs
            if kind == "add":
                seq = payload
                assert isinstance(seq, Sequence)
                try:
                    self.engine.add_sequence(seq)
                except ValueError as e:
                    seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", str(e)
                    outs.append(self.engine._output(seq))
            else:
                out = self.engine.abort(str(payload))
                if out is not None:
                    outs.append(out)

    def _loop(self) -> None:
        while not self._stop:
            outs = self._drain_inbox()
            if self.engine.has_unfinished():
                try:
                    outs += self.engine.step()
                except Exception:  # the loop must survive anything a step throws
                    log.exception("engine step raised")
            elif not outs:
                self._wake.wait()
                self._wake.clear()
                continue
            for hook in self.step_hooks:
                with contextlib.suppress(Exception):
                    hook(self.engine, outs)
            self._publish(outs)

    def _publish(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]
        ] = {}
        for out in outs:
            if out.finished:
                self._live.discard(out.request_id)
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
