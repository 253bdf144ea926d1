"""Length-aware lanes, priorities with aging, and prefix sharing under chunked prefill and aborts."""

from __future__ import annotations

import time

from tailserve.sampling import SamplingParams
from tests.tiny import run_all, tiny_engine, tiny_model
from tests.unit.test_engine import greedy, prompts, sequential

MODEL = tiny_model()


def first_token_steps(eng, ids: list[str]) -> dict[str, int]:
    """The step at which each request got its first token."""
    seen: dict[str, int] = {}
    step = 0
    while eng.has_unfinished():
        step += 1
        for o in eng.step():
            if o.new_token_ids and o.request_id in ids:
                seen.setdefault(o.request_id, step)
    return seen


def long_and_short(length_aware: bool) -> dict[str, int]:
    eng = tiny_engine(
        MODEL, max_num_batched_tokens=32, max_num_seqs=8, length_aware=length_aware, long_prefill_threshold=16
    )
    eng.add_request("long", prompts(20)[-1] * 3, greedy(4))  # 390 tokens: a dozen chunks
    eng.step()
    eng.add_request("short", prompts(21)[2], greedy(4))  # 7 tokens
    return first_token_steps(eng, ["long", "short"])


def test_long_lane_threshold_does_not_shrink_with_the_budget() -> None:
    assert tiny_engine(MODEL, max_num_batched_tokens=32, max_num_seqs=8).scheduler.long_threshold == 256
    assert tiny_engine(MODEL, max_num_batched_tokens=2048).scheduler.long_threshold == 1024


def test_short_prompt_is_not_stalled_by_a_long_prefill() -> None:
    lanes = long_and_short(length_aware=True)
    fcfs = long_and_short(length_aware=False)
    assert lanes["short"] <= 2  # the next step, beside the long prompt's chunk
    assert lanes["short"] < lanes["long"]
    assert fcfs["short"] >= fcfs["long"] - 1  # without lanes it waits behind the whole long prompt


def test_long_prefill_keeps_a_floor_of_the_budget() -> None:
    eng = tiny_engine(MODEL, max_num_batched_tokens=32, max_num_seqs=16, long_prefill_threshold=16)
    eng.add_request("long", prompts(22)[-1], greedy(2))
    for i in range(12):  # a steady stream of short prompts wanting the whole budget
        eng.add_request(f"s{i}", prompts(23 + i)[3], greedy(2))
    sched = eng.scheduler.schedule()
    by_id = {s.seq.request_id: s.num_new_tokens for s in sched.scheduled}
    assert by_id.get("long", 0) >= 32 // 4
    assert sum(by_id.values()) <= 32


def test_priority_first_and_aging_prevents_starvation() -> None:
    eng = tiny_engine(MODEL, max_num_seqs=1, priority_aging=1000.0)
    eng.add_request("low", [5, 6, 7], greedy(3), priority=5)
    eng.add_request("high", [5, 6, 8], greedy(3), priority=-1)
    order = []
    while eng.has_unfinished():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["high", "low"]

    eng = tiny_engine(MODEL, max_num_seqs=1, priority_aging=0.05)
    old = eng.add_request("old", [5, 6, 7], greedy(3), priority=5)
    old.times.arrival = time.perf_counter() - 1.0  # waited 20 aging periods: now ahead of priority 0
    eng.add_request("new", [5, 6, 8], greedy(3), priority=0)
    order = []
    while eng.has_unfinished():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["old", "new"]


def test_shortest_first_among_arrivals_together_first_come_first_served_across() -> None:
    eng = tiny_engine(MODEL, max_num_seqs=1)
    eng.add_request("older", list(range(40, 52)), greedy(2))  # 12 tokens
    eng.add_request("quick", [5, 6, 7], greedy(3))  # arrived with it, shorter: goes first
    finished = [o.request_id for o in eng.step() if o.finished]
    eng.add_request("newer", [8, 9], greedy(2))  # shorter still, but queued after "older"
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["quick", "older", "newer"]


def test_requests_arriving_while_the_prefix_is_prefilled_match_cache_off() -> None:
    shared = prompts(30)[-1]
    ps = [shared + p for p in prompts(31)[:5]]
    want = sequential(ps, greedy(), prefix_cache=False)
    eng = tiny_engine(MODEL, max_num_batched_tokens=16, max_num_seqs=8)
    got: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, greedy())
        for o in eng.step():  # the next arrives while earlier ones are mid-prefill
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid, toks in run_all(eng).items():
        got.setdefault(rid, []).extend(toks)
    assert [got[str(i)] for i in range(len(ps))] == want
    assert eng.block_manager.prefix_hits > 0


def test_abort_while_sharing_a_prefix_keeps_the_others_blocks() -> None:
    shared = prompts(40)[-1]
    ps = [shared + p for p in prompts(41)[:4]]
    want = sequential(ps, greedy(16))
    eng = tiny_engine(MODEL)
    eng.add_request("warm", shared, greedy(1))
    run_all(eng)
    got: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, greedy(16))
    for _ in range(3):
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    shared_block = eng.requests["1"].table.blocks[0]
    assert eng.block_manager.blocks[shared_block].ref_count == 4
    eng.abort("0")
    eng.abort("2")
    assert eng.block_manager.blocks[shared_block].ref_count == 2
    for rid, toks in run_all(eng).items():
        got.setdefault(rid, []).extend(toks)
    assert got["1"] == want[1] and got["3"] == want[3]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_cached_tokens_are_reported() -> None:
    shared = prompts(50)[-1]
    eng = tiny_engine(MODEL)
    eng.add_request("a", shared + [9], SamplingParams(max_tokens=1, temperature=0))
    run_all(eng)
    eng.add_request("b", shared + [10, 11], SamplingParams(max_tokens=1, temperature=0))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    # Full blocks, then the head of a's last block, indexed when a finished: all of the shared prefix.
    assert len(shared) % 4 and outs[-1].num_cached_tokens == len(shared)
