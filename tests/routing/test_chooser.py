"""The chooser: affinity where load allows, never past the bound, whatever the prefix mix."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailserve.routing.affinity import PromptSize
from tailserve.routing.backends import Backend, Lease
from tailserve.routing.chooser import Chooser, load_bound
from tailserve.routing.holders import Holders


def pool(n: int, weights: list[float] | None = None, cap: int | None = None) -> list[Backend]:
    ws = weights or [1.0] * n
    return [Backend.make(f"b{i}", ws[i], cap) for i in range(n)]


def test_same_key_same_backend_while_unloaded() -> None:
    backends = pool(4)
    c = Chooser(backends)
    picks = set()
    for _ in range(20):
        b = c.choose("prefix:abc", now=0.0)
        assert b is not None
        picks.add(b.name)  # nothing acquired: load stays 0, so the key never moves
    assert len(picks) == 1


def test_keys_spread_over_backends() -> None:
    c = Chooser(pool(4))
    owners = {c.choose(f"prefix:{i}", now=0.0).name for i in range(200)}  # type: ignore[union-attr]
    assert owners == {"b0", "b1", "b2", "b3"}


def test_hot_key_spills_once_its_backend_is_at_the_bound() -> None:
    backends = pool(2)
    c = Chooser(backends, load_factor=1.25)
    leases = [c.choose("prefix:hot", 0.0).acquire(0.0) for _ in range(40)]  # type: ignore[union-attr]
    loads = sorted(b.in_flight for b in backends)
    assert loads[1] <= load_bound(backends[0], 40, 2, 1.25)
    assert loads[0] >= 40 - load_bound(backends[0], 40, 2, 1.25)
    for lease in leases:
        lease.release(1.0, "success")
    assert all(b.in_flight == 0 for b in backends)


def test_a_spilled_key_moves_between_the_backends_holding_its_prefix() -> None:
    backends = pool(2)
    c = Chooser(backends, load_factor=1.25)
    home = c.choose("prefix:k", 0.0)
    assert home is not None and c.last_reason == "affinity"
    other = next(b for b in backends if b is not home)
    busy = [home.acquire(0.0) for _ in range(2)]  # 2 of 3 is its bound: the key must spill
    assert c.choose("prefix:k", 0.0) is other and c.last_reason == "spill_load"
    for lease in busy:
        lease.release(0.0, "success")
    assert c.choose("prefix:k", 0.0) is other  # both hold it now; equal load: the most recent
    assert c.last_reason == "affinity"
    other.acquire(0.0)
    assert c.choose("prefix:k", 0.0) is home and c.last_reason == "affinity"  # not a spill: it is cached
    assert c.decisions == {"affinity": 3, "spill_load": 1}


def test_a_key_stays_on_its_backend_under_the_bound_though_others_are_idle() -> None:
    c = Chooser(pool(3), load_factor=2.0)
    home = c.choose("prefix:k", 0.0)
    assert home is not None
    home.acquire(0.0)  # 2 of 2 in flight: within ceil(2.0 · 2 / 3) = 2
    assert c.choose("prefix:k", 0.0) is home  # not to an idle backend where the prefix is cold


def test_holders_are_bounded_and_most_recent_first() -> None:
    h = Holders(max_keys=2, max_per_key=2)
    h.served("a", "x")
    h.served("a", "y")
    h.served("a", "z")
    assert h.of("a") == ["z", "y"]
    h.served("b", "x")
    h.served("a", "x")  # a is used again: b is now the least recent
    h.served("c", "x")
    assert len(h) == 2 and h.of("b") == [] and h.of("a") == ["x", "z"]


def test_no_key_goes_to_least_loaded_by_weight() -> None:
    backends = pool(2, weights=[1.0, 3.0])
    c = Chooser(backends)
    for _ in range(40):
        c.choose(None, 0.0).acquire(0.0)  # type: ignore[union-attr]
    assert [b.in_flight for b in backends] == [10, 30]


def test_unavailable_backends_are_skipped_and_none_when_all_are() -> None:
    backends = pool(2, cap=1)
    c = Chooser(backends)
    a = c.choose("k", 0.0)
    assert a is not None
    a.acquire(0.0)
    b = c.choose("k", 0.0)
    assert b is not None and b is not a
    b.acquire(0.0)
    assert c.choose("k", 0.0) is None  # both at their cap
    backends[0].in_flight = 0
    backends[0].cool(0.0, 2.0)  # Retry-After: 2
    assert c.choose("k", 1.0) is None
    assert backends[0].wait_hint(1.0) == pytest.approx(1.0)
    assert c.wait_hint(1.0) == 0.0  # b1 is only at its cap: free as soon as a request ends
    assert c.choose("k", 2.0) is backends[0]


def test_tried_backends_are_last_resort() -> None:
    backends = pool(2)
    c = Chooser(backends)
    first = c.choose("k", 0.0)
    assert first is not None
    second = c.choose("k", 0.0, tried={first.name})
    assert second is not None and second is not first
    assert c.choose("k", 0.0, tried={"b0", "b1"}) is not None


def test_bad_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        Chooser([Backend.make("a"), Backend.make("a")])
    with pytest.raises(ValueError, match="load_factor"):
        Chooser(pool(2), load_factor=0.5)
    with pytest.raises(ValueError, match="weight"):
        Backend.make("a", weight=0)


def test_lease_releases_once() -> None:
    b = Backend.make("a")
    lease: Lease = b.acquire(0.0)
    lease.release(0.0, "failure")
    lease.release(0.0, "failure")
    assert b.in_flight == 0


# Skewed prefix mixes: a few keys, one of them hot, with arrivals and departures interleaved.
events = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 7)),  # key index; 0 is drawn most (see below)
        st.tuples(st.just("depart"), st.integers(0, 10_000)),
        st.tuples(st.just("report"), st.integers(0, 10_000)),  # a backend publishes its count
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 6),
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=6, max_size=6),
    load_factor=st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0]),
    hot=st.floats(0.0, 1.0),
    events=events,
    seed=st.integers(0, 2**32 - 1),
    ttfts=st.lists(st.one_of(st.none(), st.floats(0.0, 3.0)), min_size=6, max_size=6),
    rates=st.lists(st.one_of(st.none(), st.floats(10.0, 5000.0)), min_size=6, max_size=6),
)
def test_property_no_backend_is_given_more_than_the_bound(
    n: int,
    weights: list[float],
    load_factor: float,
    hot: float,
    events: list[tuple[str, int]],
    seed: int,
    ttfts: list[float | None],
    rates: list[float | None],
) -> None:
    """Whatever the keys (any share on one hot prefix), whatever TTFT and prefill rate the backends
    publish, whatever the prompts' sizes and cached shares, and whatever the backends publish of the
    requests they hold (all of them ours: the gateway as their only client), every request the chooser
    places leaves its backend within ceil(c · total · w / W): at most c times its weighted share of the
    mean."""
    rng = random.Random(seed)
    backends = pool(n, weights[:n])
    for b, ttft, rate in zip(backends, ttfts, rates):
        b.report(ttft=ttft, now=0.0, rate=rate)
    c = Chooser(backends, load_factor)
    live: list[Lease] = []
    total_weight = sum(b.weight for b in backends)
    for kind, value in events:
        if kind == "depart":
            if live:
                live.pop(value % len(live)).release(0.0, "success")
            continue
        if kind == "report":
            b = backends[value % n]
            queued = value % (b.in_flight + 1)
            b.report(waiting=queued, running=b.in_flight - queued, now=0.0)
            continue
        key = "prefix:hot" if rng.random() < hot else f"prefix:{value}"
        tokens = rng.choice([0.0, 50.0, 500.0, 4000.0])
        b = c.choose(key, 0.0, prompt=PromptSize(tokens, tokens * rng.random()))
        assert b is not None  # no caps, no breakers: someone always takes it
        live.append(b.acquire(0.0))
        total = sum(x.in_flight for x in backends)
        assert total == len(live)
        assert b.in_flight <= load_bound(b, total, total_weight, load_factor)
    if all(kind != "depart" for kind, _ in events):  # arrivals only: the bound holds for all at once
        total = len(live)
        for b in backends:
            assert b.in_flight <= load_bound(b, total, total_weight, load_factor)


def test_rank_puts_the_choice_first_then_the_least_loaded() -> None:
    backends = pool(3)
    chooser = Chooser(backends)
    first = chooser.choose("prefix:k", now=0.0)
    ranked = chooser.rank("prefix:k", now=0.0)
    assert ranked[0] is first and sorted(b.name for b in ranked) == sorted(b.name for b in backends)
    rest = ranked[1:]
    rest[0].in_flight, rest[1].in_flight = 3, 0
    again = chooser.rank("prefix:k", now=0.0)
    assert again[0] is first and [b.in_flight for b in again[1:]] == [0, 3]
    # A backend that already failed this request goes last; one that is unavailable is left out.
    assert chooser.rank("prefix:k", now=0.0, tried=[again[1].name])[-1] is again[1]
    again[2].max_concurrency = 3
    assert again[2] not in chooser.rank("prefix:k", now=0.0)


def test_the_one_backend_left_is_chosen_whatever_its_load_and_still_holds_the_key() -> None:
    backends = pool(2)
    c = Chooser(backends)
    backends[1].in_flight = 5  # far past the load bound
    for key in ("prefix:k", None):
        assert c.choose(key, now=0.0, tried={"b0"}) is backends[1]
        assert c.last_reason == "least_loaded"
    assert c.holders.of("prefix:k") == ["b1"]
