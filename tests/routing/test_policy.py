"""Breaker, backoff and retry budget: the state machines, driven by explicit time."""

from __future__ import annotations

import random

from tailserve.routing.breaker import Breaker, BreakerConfig, State
from tailserve.routing.retry import RetryBudget, backoff, parse_retry_after, retryable_status


def test_breaker_opens_after_failures_in_window() -> None:
    b = Breaker(BreakerConfig(failures=3, window=10.0, open_for=5.0, successes=2))
    b.on_failure(0.0)
    b.on_failure(1.0)
    b.on_failure(20.0)  # the first two fell out of the window
    assert b.current(20.0) is State.CLOSED
    b.on_failure(21.0)
    b.on_failure(22.0)
    assert b.current(22.0) is State.OPEN
    assert not b.available(24.0)
    assert b.retry_after(24.0) == 3.0


def test_breaker_half_open_probes_then_closes() -> None:
    b = Breaker(BreakerConfig(failures=1, open_for=5.0, probes=1, successes=2))
    b.on_failure(0.0)
    assert b.current(5.0) is State.HALF_OPEN
    assert b.available(5.0)
    b.on_start(5.0)
    assert not b.available(5.0)  # one probe at a time
    b.on_success(6.0)
    assert b.current(6.0) is State.HALF_OPEN
    b.on_start(6.0)
    b.on_success(6.5)
    assert b.current(6.5) is State.CLOSED


def test_breaker_reopens_on_probe_failure_and_neutral_frees_the_slot() -> None:
    b = Breaker(BreakerConfig(failures=1, open_for=1.0, probes=1))
    b.on_failure(0.0)
    b.on_start(1.0)
    b.on_neutral(1.5)
    assert b.available(1.5)
    b.on_start(1.5)
    b.on_failure(2.0)
    assert b.current(2.0) is State.OPEN
    assert b.opened_at == 2.0


def test_backoff_is_full_jitter_under_the_cap() -> None:
    rng = random.Random(0)
    for attempt in range(1, 10):
        cap = min(1.0, 0.05 * 2 ** (attempt - 1))
        draws = [backoff(attempt, 0.05, 1.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        assert min(draws) < 0.1 * cap and max(draws) > 0.9 * cap  # spread over the whole range


def test_retry_budget_is_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_retries=2, window=10.0)
    for t in range(100):
        budget.on_request(t * 0.01)
    allowed = sum(budget.try_retry(1.0) for _ in range(100))
    assert allowed == 22  # 2 + 0.2 · 100
    assert budget.try_retry(30.0)  # the window moved on


def test_retry_after_and_statuses() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None
    assert all(retryable_status(s) for s in (429, 500, 502, 503, 504))
    assert not any(retryable_status(s) for s in (400, 401, 404, 413))


def test_affinity_key() -> None:
    from tailserve.routing.affinity import affinity_key

    system = {"role": "system", "content": "You are terse."}
    turn1 = {"messages": [system, {"role": "user", "content": "a"}]}
    turn2 = {"messages": [system, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}]}  # fmt: skip
    other = {
        "messages": [{"role": "system", "content": "You are verbose."}, {"role": "user", "content": "a"}]
    }
    assert affinity_key(turn1) == affinity_key(turn2) != affinity_key(other)
    assert affinity_key({**turn1, "tools": [{"type": "function"}]}) != affinity_key(turn1)
    as_user = {"messages": [{"role": "user", "content": "You are terse."}, {"role": "user", "content": "a"}]}
    assert affinity_key(as_user) != affinity_key(turn1)  # the role is part of the key
    named = {"messages": [{**system, "name": "n"}, {"role": "user", "content": "a"}]}
    assert affinity_key(named) != affinity_key(turn1)  # and every other field of the message
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]}]}
    assert affinity_key(parts) not in (None, affinity_key(turn1))
    assert affinity_key({**turn1, "user": "u1"}) == "session:u1"
    assert affinity_key(turn1, session="s") == "session:s"
    long_a, long_b = "x" * 2000 + "a", "x" * 2000 + "b"
    assert affinity_key({"prompt": long_a}) == affinity_key({"prompt": long_b})  # same leading text
    assert affinity_key({"prompt": "abc"}) != affinity_key({"prompt": "abd"})
    assert affinity_key({"prompt": [1, 2, 3]}) == affinity_key({"prompt": [[1, 2, 3]]})
    assert affinity_key({"prompt": ""}) is None and affinity_key({}) is None


def test_prompt_size_counts_the_part_a_holder_of_the_key_has_cached() -> None:
    from tailserve.routing.affinity import PromptSize, prompt_size

    system = {"role": "system", "content": "s" * 400}
    chat = {"messages": [system, {"role": "user", "content": [{"type": "text", "text": "q" * 40}]}]}
    assert prompt_size(chat, "prefix:x") == PromptSize(110.0, 100.0)  # 4 characters a token
    assert prompt_size(chat, None) == PromptSize(110.0, 0.0)
    turns = {"messages": [*chat["messages"], {"role": "user", "content": "r" * 8}]}
    assert prompt_size(turns, "session:u") == PromptSize(112.0, 110.0)  # all turns but the last
    assert prompt_size({"prompt": "p" * 8000}, "prefix:y") == PromptSize(2000.0, 256.0)  # the key's 1024
    assert prompt_size({"prompt": [[1] * 300, "abcd"]}, "prefix:z") == PromptSize(301.0, 256.0)  # ids
    assert prompt_size({"prompt": [1, 2]}, "session:s") == PromptSize(2.0, 0.0)
