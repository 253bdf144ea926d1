"""Admission control without a model: the caps, the queue-wait prediction, tickets, API keys."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailserve.server.admission import Admission, Limits, Rejected, estimate_tokens


@dataclass
class Load:
    num_running: int = 0
    num_waiting: int = 0
    prefill_tokens_per_s: float = 0.0


def admission(**kw) -> Admission:
    limits = {"max_num_seqs": 2, "max_num_batched_tokens": 100, "max_queue": 2, "max_queue_tokens": 1000} | kw
    return Admission(Limits(**limits))


def rejected(
    adm: Admission, load: Load, count: int = 1, tokens: int = 10, timeout: float | None = None
) -> Rejected:
    with pytest.raises(Rejected) as e:
        adm.admit(load, count, tokens, timeout)
    return e.value


def test_running_slots_then_queue_then_429() -> None:
    adm, load = admission(), Load()
    tickets = [adm.admit(load, 1, 10, None) for _ in range(4)]  # 2 running slots + 2 queued
    r = rejected(adm, load)
    assert (r.status, r.code, r.retry_after) == (429, "queue_full", 1)
    tickets[0].release()
    adm.admit(load, 1, 10, None)
    assert adm.in_flight == 4


def test_fan_out_counts_every_engine_request() -> None:
    adm, load = admission(), Load()
    assert rejected(adm, load, count=5).code == "queue_full"
    adm.admit(load, 4, 10, None)
    assert adm.in_flight == 4 and adm.queued_tokens == 40


def test_engine_waiting_counts_but_a_stale_snapshot_never_blocks_an_idle_server() -> None:
    adm = admission(max_num_seqs=64, max_queue=1)
    adm.admit(Load(), 1, 10, None)
    assert adm.queued_requests(Load(num_waiting=1)) == 1  # KV pool full: the engine could not start it
    assert rejected(adm, Load(num_waiting=1)).code == "queue_full"
    fresh = admission(max_num_seqs=64, max_queue=0)
    fresh.admit(Load(num_waiting=50), 1, 10, None)  # a snapshot from before the last abort


def test_queued_token_cap_but_an_idle_server_takes_any_prompt() -> None:
    adm, load = admission(max_num_seqs=10, max_queue=10, max_queue_tokens=100), Load()
    t = adm.admit(load, 1, 500, None)
    r = rejected(adm, load, tokens=1)
    assert r.code == "queue_full" and "prompt tokens" in r.message
    t.started(0)  # prefilled: its tokens leave the queue
    adm.admit(load, 1, 100, None)


def test_queue_wait_prediction_sheds_against_max_queue_wait() -> None:
    adm = admission(max_num_seqs=10, max_queue=10, max_queue_tokens=10**6, max_queue_wait=1.0)
    load = Load(prefill_tokens_per_s=1000.0)
    adm.admit(load, 1, 1500, None)  # 1.5 s of prefill ahead of whatever comes next
    r = rejected(adm, load)
    assert (r.status, r.code, r.retry_after) == (429, "queue_wait_exceeded", 2)


def test_deadline_aware_shedding_uses_time_to_first_token() -> None:
    adm = admission(max_num_seqs=10, max_queue=10, max_queue_tokens=10**6)
    load = Load(prefill_tokens_per_s=1000.0)
    adm.admit(load, 1, 500, None)
    assert rejected(adm, load, tokens=600, timeout=1.0).code == "deadline_unmeetable"  # 1.1 s > 1 s
    adm.admit(load, 1, 400, timeout=1.0)  # 0.9 s fits
    adm.admit(load, 1, 10_000, timeout=None)  # no deadline: no prediction to fail


def test_decodes_shrink_the_predicted_prefill_rate() -> None:
    adm = admission(max_num_seqs=100, max_queue=100, max_queue_tokens=10**6)
    assert adm.prefill_rate(Load(num_running=50, prefill_tokens_per_s=1000.0)) == 500.0
    assert adm.predict(Load(), 100) is None  # no rate measured yet: never shed on a guess


def test_exact_token_count_rechecks_only_token_caps() -> None:
    adm = admission(max_num_seqs=10, max_queue=10, max_queue_tokens=1000)
    load = Load()
    other = adm.admit(load, 1, 10, None)
    t = adm.admit(load, 2, estimate_tokens(40), None)
    assert adm.queued_tokens == 10 + 2 * 10
    t.resize(load, 300, None)
    assert adm.queued_tokens == 10 + 600
    with pytest.raises(Rejected):
        t.resize(load, 600, None)
    t.release()
    other.release()
    assert (adm.in_flight, adm.queued_tokens) == (0, 0)


def test_draining_answers_503() -> None:
    adm = admission()
    adm.draining = True
    r = rejected(adm, Load())
    assert (r.status, r.code) == (503, "draining")


def test_timeout_is_capped_by_the_server() -> None:
    adm = admission(request_timeout=10.0)
    assert adm.timeout(None) == 10.0 and adm.timeout(2.0) == 2.0 and adm.timeout(60.0) == 10.0
    assert admission().timeout(None) is None


def test_api_key() -> None:
    adm = Admission(admission().limits, api_key="sekret")
    assert adm.authorized("Bearer sekret") and adm.authorized("bearer sekret")
    assert not adm.authorized(None) and not adm.authorized("Bearer nope") and not adm.authorized("sekret")
    assert admission().authorized(None)


@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "start", "finish", "release", "resize"]), st.integers(0, 5)),
        max_size=60,
    )
)
def test_counters_return_to_zero(ops: list[tuple[str, int]]) -> None:
    """Whatever order tickets start, finish, resize and release in, nothing leaks."""
    adm = admission(max_num_seqs=3, max_queue=3, max_queue_tokens=200)
    load, tickets = Load(), []
    for op, k in ops:
        if op == "admit":
            with contextlib.suppress(Rejected):
                tickets.append(adm.admit(load, 1 + k % 3, 10 * k, None))
        elif tickets:
            t = tickets[k % len(tickets)]
            if op == "start":
                t.started(k % t.count)
            elif op == "finish":
                t.finished(k % t.count)
            elif op == "release":
                t.release()
            else:
                try:
                    t.resize(load, 5 * k, None)
                except Rejected:
                    t.release()
        assert adm.in_flight >= 0 and adm.queued_tokens >= 0
    for t in tickets:
        t.release()
    assert (adm.in_flight, adm.queued_tokens) == (0, 0)
