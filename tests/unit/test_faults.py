"""Faults inside the engine, on a tiny model: a request that fails in a step ends alone; anything else
ends the engine thread, and every stream hears of it; a reader that falls behind loses its stream."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tailserve.engine.async_engine import SLOW_READER, AsyncEngine
from tailserve.engine.engine import LLMEngine
from tailserve.sampling import SamplingParams
from tests.tiny import run_all, tiny_engine


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a loaded machine a spinning team is 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = {f"r{i}": [5 + i, 17, 42, 9 + i, 3] for i in range(4)}
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


# A request whose sampling parameters make the sampler raise (an object of their own: matched by identity).
PARAMS_BAD = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def poison(engine: LLMEngine, bad: str, where: str) -> None:
    """Make every batch that holds request `bad` raise: in the model run, or in the sampler."""
    if where == "runner":
        run = engine.runner.run

        def failing_run(scheduled):
            if any(s.seq.request_id == bad for s in scheduled):
                raise RuntimeError("injected fault")
            return run(scheduled)

        engine.runner.run = failing_run
        return
    sampler = engine.sampler

    def failing_sampler(logits, rows):
        if any(r.params is PARAMS_BAD for r in rows):
            raise FloatingPointError("injected sampler fault")
        return sampler(logits, rows)

    engine.sampler = failing_sampler


def outputs(engine: LLMEngine) -> dict[str, list]:
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out)
    return got


@pytest.mark.parametrize("where", ["runner", "sampler"])
def test_a_request_that_fails_in_the_step_ends_alone(where: str) -> None:
    clean = tiny_engine()
    for rid, p in PROMPTS.items():
        clean.add_request(rid, p, PARAMS)
    expected = run_all(clean)

    engine = tiny_engine()
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, PARAMS_BAD if rid == "r2" and where == "sampler" else PARAMS)
    poison(engine, "r2", where)
    got = outputs(engine)
    final = {rid: outs[-1] for rid, outs in got.items()}
    assert final["r2"].finish_reason == "error" and "injected" in final["r2"].error
    for rid in ("r0", "r1", "r3"):  # the others: as if nothing happened, token for token
        assert final[rid].finish_reason == "length"
        assert [t for o in got[rid] for t in o.new_token_ids] == expected[rid]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.scheduler.running


def test_a_batch_that_always_fails_fails_its_requests_and_the_engine_goes_on() -> None:
    engine = tiny_engine()
    for rid, p in PROMPTS.items():
        engine.add_request(rid, p, PARAMS)

    def broken(scheduled):
        raise RuntimeError("the model is broken")

    engine.runner.run = broken
    got = outputs(engine)
    assert {o[-1].finish_reason for o in got.values()} == {"error"}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def stream_all(aengine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> list:
    async def run() -> list:
        return [o async for o in aengine.generate(prompt, params, rid)]

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_the_engine_thread_dying_ends_every_stream_and_refuses_new_ones() -> None:
    engine = tiny_engine()
    aengine = AsyncEngine(engine)
    schedule = engine.scheduler.schedule

    def failing_schedule():
        if "kill" in engine.requests:
            raise RuntimeError("scheduler state corrupt")
        return schedule()

    engine.scheduler.schedule = failing_schedule
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[list, list]:
        async def collect(rid: str) -> list:
            return [o async for o in aengine.generate([5, 6, 7], long, rid)]

        first = asyncio.create_task(collect("victim"))
        await asyncio.sleep(0.05)
        killer = asyncio.create_task(collect("kill"))
        return await asyncio.wait_for(asyncio.gather(first, killer), 10)

    try:
        victim, killer = asyncio.run(main())
        for outs in (victim, killer):
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert "scheduler state corrupt" in outs[-1].error
        assert not aengine.alive and "scheduler state corrupt" in aengine.failure
        after = stream_all(aengine, "late", [5, 6], PARAMS)  # answered at once, never queued
        assert len(after) == 1 and after[0].finish_reason == "error"
    finally:
        aengine.shutdown()


def test_a_reader_that_falls_behind_loses_its_stream_and_nobody_waits_for_it() -> None:
    engine = tiny_engine(kv_cache_memory=0.05)
    step = engine.step

    def paced_step():  # steps of at least 5 ms, so a reader that keeps up never holds 32 deltas
        time.sleep(0.005)
        return step()

    engine.step = paced_step
    aengine = AsyncEngine(engine, max_buffered=32)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[list, list]:
        slow = aengine.generate([5, 6, 7], long, "slow")
        first = await slow.__anext__()  # then it stops reading
        fast = [o async for o in aengine.generate([8, 9], short, "fast")]  # a full answer meanwhile
        assert "slow" not in engine.requests  # aborted long before its 400 tokens
        rest = [o async for o in slow]
        return [first, *rest], fast

    try:
        t0 = time.perf_counter()
        slow, fast = asyncio.run(asyncio.wait_for(main(), 20))
        assert fast[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in fast) == 100
        end = slow[-1]
        assert end.finish_reason == "abort" and end.error.startswith(SLOW_READER)
        assert len(slow) <= 32 + 2  # what was buffered, the first delta and the end: bounded
        assert aengine.slow_reader_aborts == 1
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert time.perf_counter() - t0 < 20
    finally:
        aengine.shutdown()
