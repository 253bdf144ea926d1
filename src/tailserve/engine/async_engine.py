"""AsyncEngine: the LLMEngine's step loop on its own thread, with async streams of deltas and aborts, so
HTTP never waits on a model step nor the other way.

Faults: a request that fails inside a step ends alone (engine/faults.py). Anything else escaping a step
leaves the engine's state unknown, so the thread ends: every open stream gets a final "error" delta at
once (no client waits forever), `alive` turns false (`/ready` answers 503) and the server exits for its
supervisor to restart it (server/supervise.py). A stream whose reader falls `max_buffered` deltas
behind is aborted (`SLOW_READER`): the engine never waits for a reader, so without the bound a stalled
client would hold an ever-growing queue of deltas and its KV blocks to the end of its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from tailserve.config import EngineConfig, ServerConfig
from tailserve.engine.engine import EngineStats, LLMEngine
from tailserve.engine.outputs import RequestOutput
from tailserve.engine.sequence import Sequence, Status
from tailserve.sampling import SamplingParams
from tailserve.structured.grammar import Grammar, GrammarCompiler, GrammarError, GrammarSpec, Vocabulary

log = logging.getLogger("tailserve.engine")

MAX_BUFFERED_DELTAS = ServerConfig.stream_buffer
SLOW_READER = "the client read the stream too slowly"


class AsyncEngine:
    """Runs an LLMEngine on a dedicated thread; callers get async streams of RequestOutput deltas."""

    def __init__(self, engine: LLMEngine, max_buffered: int = MAX_BUFFERED_DELTAS) -> None:
        self.engine = engine
        self.max_buffered = max_buffered
        self.failure: str | None = None  # why the engine thread ended, if it died
        self.slow_reader_aborts = 0  # streams aborted for falling max_buffered deltas behind
        self.overflow_hooks: list[Callable[[], None]] = []  # called (on the event loop) per such abort
        self._overflowed: set[str] = set()  # streams ended by their reader's lag: later deltas are dropped
        self._dead = False
        self._lock = threading.Lock()  # orders stream registration against the thread's death
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
        """False from the moment the engine thread starts to end (its streams are being failed then)."""
        return not self._dead and self._thread.is_alive()

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
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            if self._dead:
                yield self._error_output(request_id)
                return
            self._live.add(request_id)
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
            self._overflowed.discard(request_id)
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

    def wait_prepared(self) -> None:
        """Until the grammar vocabulary is prepared, if structured outputs are on. Its last part (the
        llguidance tokenizer, ~0.2 s) holds the GIL at a stretch: a request arriving meanwhile would
        wait it out, so the server is not ready before it ends."""
        if self._grammars is not None:
            self._grammars.wait_prepared()

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
        try:
            self._steps()
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            log.critical("the engine thread died: %s", self.failure, exc_info=e)
        finally:
            self._fail_streams()

    def _steps(self) -> None:
        while not self._stop:
            outs = self._drain_inbox()
            if self.engine.has_unfinished():
                outs += self.engine.step()  # what escapes a step is fatal: see the module's docstring
            elif not outs:
                self._wake.wait()
                self._wake.clear()
                continue
            for hook in self.step_hooks:
                with contextlib.suppress(Exception):
                    hook(self.engine, outs)
            self._publish(outs)

    def _publish(self, outs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]]
        by_loop = {}
        for out in outs:
            if out.finished:
                self._live.discard(out.request_id)
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
        """On the stream's event loop: queue each delta, or end a stream whose reader fell too far behind."""
        for q, out in items:
            rid = out.request_id
            if rid in self._overflowed:
                continue  # its final delta is queued already
            if not out.finished and q.qsize() >= self.max_buffered:
                self._overflowed.add(rid)
                self.slow_reader_aborts += 1
                self.abort(rid)
                q.put_nowait(
                    dataclasses.replace(
                        out,
                        new_token_ids=[],
                        new_text="",
                        logprobs=None,
                        finished=True,
                        finish_reason="abort",
                        error=f"{SLOW_READER}: {q.qsize()} deltas waited unread; the request was aborted",
                    )
                )
                for hook in self.overflow_hooks:
                    with contextlib.suppress(Exception):
                        hook()
                continue
            q.put_nowait(out)

    def _error_output(self, request_id: str) -> RequestOutput:
        return RequestOutput(
            request_id,
            [],
            "",
            finished=True,
            finish_reason="error",
            error=f"the engine has stopped ({self.failure or 'shut down'})",
        )

    def _fail_streams(self) -> None:
        """The thread is ending: each open stream gets its final error delta now; no stream opens later."""
        with self._lock:
            self._dead = True
            streams = list(self._streams.items())
        for rid, (loop, q) in streams:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, self._error_output(rid))
