"""The pure policy: budget split, allowances, path weights, compression facts/validation/decision,
cache keys and expiry, the stable-prefix check, server rates. No I/O."""

from __future__ import annotations

import pytest

from tailserve.pipeline import compress
from tailserve.pipeline.budget import Budget, allowance
from tailserve.pipeline.cache import TTLCache, normalise
from tailserve.pipeline.dag import path_weights
from tailserve.pipeline.layout import StableCheck, layout
from tailserve.pipeline.rates import rates
from tailserve.pipeline.stage import Stage


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def _nothing(ctx: object) -> None:
    return None


def test_allowance_is_a_share_of_what_is_left_capped() -> None:
    assert allowance(1.0, 1, 4) == pytest.approx(0.25)
    assert allowance(1.0, 1, 4, cap_s=0.1) == pytest.approx(0.1)
    assert allowance(1.0, 3, 3) == pytest.approx(1.0)  # the last stage on its path takes all that is left
    assert allowance(0.0, 1, 1) == 0.0
    assert allowance(-1.0, 1, 2) == 0.0


def test_budget_remaining_follows_the_clock() -> None:
    clock = Clock()
    b = Budget(2.0, clock)
    clock.t += 0.5
    assert b.remaining() == pytest.approx(1.5) and b.deadline == pytest.approx(102.0)
    clock.t += 2
    assert b.remaining() == 0.0


def test_path_weights_take_the_heaviest_chain_and_reject_cycles() -> None:
    stages = [
        Stage("retrieve", _nothing, weight=1),
        Stage("tools", _nothing, weight=2),
        Stage("compress", _nothing, weight=1, after=("retrieve",)),
        Stage("answer", _nothing, weight=4, after=("compress", "tools")),
    ]
    w = path_weights(stages)
    assert w == {"retrieve": 6, "tools": 6, "compress": 5, "answer": 4}
    with pytest.raises(ValueError, match="cycle"):
        path_weights([Stage("a", _nothing, after=("b",)), Stage("b", _nothing, after=("a",))])
    with pytest.raises(ValueError, match="unknown"):
        path_weights([Stage("a", _nothing, after=("x",))])


ORIGINAL = (
    "user: My order 4417 was charged $129.50 on March 3, 2026 by Acme Outdoor.\n"
    'assistant: I see it. Maria Lopez from billing said "refund within 14 days".'
)


def test_facts_find_numbers_names_dates_and_quotes() -> None:
    f = compress.facts(ORIGINAL)
    assert {"4417", "129.50", "14"} <= f.numbers
    assert "Acme Outdoor" in f.names and "Maria Lopez" in f.names
    assert "March 3, 2026" in f.dates
    assert "refund within 14 days" in f.quotes
    assert "My" not in f.names and "I" not in f.names  # sentence openers and pronouns are no names


def test_validation_rejects_a_summary_that_drops_a_number_or_a_name() -> None:
    good = (
        "Order 4417 was charged $129.50 on March 3, 2026 by Acme Outdoor; Maria Lopez from billing said "
        '"refund within 14 days".'
    )
    assert compress.validate(ORIGINAL, good).ok
    no_number = good.replace("$129.50", "some money")
    v = compress.validate(ORIGINAL, no_number)
    assert not v.ok and v.reason == "missing_facts" and "129.50" in v.missing
    no_name = good.replace("Maria Lopez", "someone")
    v = compress.validate(ORIGINAL, no_name)
    assert not v.ok and "Maria Lopez" in v.missing


def test_validation_rejects_an_invented_summary() -> None:
    invented = (  # every fact is there; the rest is made up
        'Order 4417 $129.50 March 3, 2026 Acme Outdoor Maria Lopez "refund within 14 days" '
        "plus the customer wants a purple elephant delivered tomorrow via helicopter express shipping"
    )
    v = compress.validate(ORIGINAL, invented)
    assert not v.ok and v.reason == "low_overlap" and v.overlap < 0.6
    assert compress.validate(ORIGINAL, "").reason == "empty"


def test_fallback_keeps_system_first_turn_and_last_turns() -> None:
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i}"} for i in range(8)
    ]
    out = compress.fallback(msgs, keep_last=3)
    assert [m["content"] for m in out] == ["s", "t0", "t5", "t6", "t7"]
    summ = compress.with_summary(msgs, 3, "sum")
    assert [m["content"] for m in summ][2:] == ["t5", "t6", "t7"] and "sum" in summ[1]["content"]


def test_decide_compresses_only_above_the_threshold_and_when_it_pays() -> None:
    assert compress.decide(500, 400, 1000.0, 50, 0.0, 1024).reason == "below_threshold"
    assert compress.decide(4000, 3000, None, 50, 0.1, 1024).reason == "no_rate"
    assert compress.decide(4000, 40, 1000.0, 50, 0.0, 1024).reason == "nothing_old"
    d = compress.decide(4000, 3050, 1000.0, 50, 2.0, 1024)  # saves 3 s, costs 2 s
    assert d.compress and d.saved_s == pytest.approx(3.0)
    d = compress.decide(4000, 3050, 1000.0, 50, 4.0, 1024)  # saves 3 s, costs 4 s
    assert not d.compress and d.reason == "not_worth"
    assert compress.summary_cost(3000, 100, 1000.0, 0.01) == pytest.approx(4.0)


def test_normalised_keys_and_cache_hits_expiry_and_lru() -> None:
    assert normalise("  What is the Refund   policy? ") == normalise("what is the refund policy")
    clock = Clock()
    c = TTLCache("t", max_entries=2, ttl_s=10, clock=clock)
    c.put("a", 1)
    assert c.get("a") == 1 and c.stats.hits == 1
    assert c.get("b") is None and c.stats.misses == 1
    clock.t += 10
    assert c.get("a") is None and c.stats.expired == 1
    c.put("a", 1)
    c.put("b", 2)
    c.get("a")  # a is now the most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.stats.evicted == 1


def test_layout_puts_stable_first_and_the_check_warns_on_change(caplog: pytest.LogCaptureFixture) -> None:
    convo = [{"role": "user", "content": "hi"}]
    a = layout("Be brief.", ["doc one"], convo)
    assert a.messages[0]["role"] == "system" and a.messages[0]["content"].startswith("Be brief.")
    assert "[1] doc one" in a.messages[0]["content"] and a.messages[-1] == convo[0]
    assert layout("Be brief.", ["other doc"], convo).stable_key == a.stable_key  # documents vary
    check = StableCheck()
    assert not check.observe("c1", a.stable_key)
    assert not check.observe("c1", a.stable_key)
    assert check.observe("c1", layout("Be brief. Today is Monday.", [], convo).stable_key)
    assert check.changed == 1 and "stable prompt prefix changed" in caplog.text


def test_rates_from_two_scrapes() -> None:
    def s(prompt: float, hits: float, prefill: float, tpot_sum: float, tpot_n: float) -> dict:
        m = (("model", "m"),)
        return {
            ("tailserve:prompt_tokens_total", m): prompt,
            ("tailserve:prefix_cache_hits_total", m): hits,
            (
                "tailserve:request_prefill_time_seconds_sum",
                (("model", "m"), ("prompt_len_bucket", "<128")),
            ): prefill,
            ("tailserve:request_time_per_output_token_seconds_sum", m): tpot_sum,
            ("tailserve:request_time_per_output_token_seconds_count", m): tpot_n,
        }

    r = rates(s(1000, 200, 1.0, 0.1, 10), s(5000, 1200, 2.0, 0.5, 30))
    assert r.prefill_tokens_per_s == pytest.approx(3000.0)
    assert r.s_per_output_token == pytest.approx(0.02)
    assert rates({}, {}).prefill_tokens_per_s is None


def test_fit_tokens_trims_max_tokens_to_the_time_left() -> None:
    from tailserve.pipeline.budget import fit_tokens

    assert fit_tokens(2.0, 0.5, 0.01, 500) == 150
    assert fit_tokens(2.0, 0.5, 0.01, 100) == 100
    assert fit_tokens(0.4, 0.5, 0.01, 100) == 0
    assert fit_tokens(1.0, 0.5, None, 100) == 100
