"""A step that raised: end only the requests that fail on their own, never the batch, never the loop.

One bad request (a sampling corner case, a broken logits input, a kernel refusing its shape) must not
take down the other requests that shared its step. When a batch raises before any sequence advanced
(the model, the sampler, the masks: everything before the update of `num_computed`), nothing of it was
committed, so each request of the batch is run again alone: those that fail alone end with
finish_reason "error" (their clients get an error), the others advance as if nothing happened. A
rerun writes the same KV slots the failed attempt did, so what it wrote is simply overwritten.

A batch that raised after some sequence advanced cannot be rerun (the rows would run twice): all of
its unfinished requests end with the error, as before. Failures outside `_run` (the scheduler, the
block manager, the partial-hit copies) leave engine state unknown; they escape `LLMEngine.step` and end
the engine thread, which `AsyncEngine` turns into errors for every stream and the server into an exit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tailserve.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from tailserve.engine.engine import LLMEngine

log = logging.getLogger("tailserve.engine")


def engine_error(e: BaseException) -> str:
    """The error message a client sees for a request the engine could not run."""
    return f"engine error: {type(e).__name__}: {e}"


def rerun_alone(engine: LLMEngine, sched: SchedulerOutput, error: Exception) -> None:
    """After `engine._run(sched)` raised `error`: rerun each request alone where that is safe."""
    batch = [s for s in sched.scheduled if not s.seq.finished]
    untouched = all(s.seq.num_computed == s.start for s in batch)
    if len(batch) < 2 or not untouched:
        log.error("engine step failed: %d requests end with the error", len(batch), exc_info=error)
        for s in batch:
            engine._finish(s.seq, "error", error=engine_error(error))
        return
    log.warning("engine step of %d requests failed (%r): rerunning each alone", len(batch), error)
    failed = 0
    for s in batch:
        if s.draft:  # guesses are planned again, with room for them allocated again
            s.draft = []
            engine.block_manager.trim(s.seq.table, s.seq.num_tokens)
        try:
            engine._run(SchedulerOutput(scheduled=[s]), time.perf_counter())
        except Exception as e:
            failed += 1
            log.error("request %s failed alone: it ends with the error", s.seq.request_id, exc_info=e)
            engine._finish(s.seq, "error", error=engine_error(e))
    log.warning("%d of %d requests of the failed step failed alone", failed, len(batch))
