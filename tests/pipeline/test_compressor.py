"""The compression stage against a fake small model: a summary that drops a number or a name is
rejected and the first + last turns are used; a faithful one replaces the older turns; decisions
and failures are counted; below the threshold nothing is sent."""

from __future__ import annotations

import asyncio

from tailserve.pipeline.compressor import CompressionConfig, Compressor
from tailserve.pipeline.llm import LLMClient
from tailserve.pipeline.rates import Rates
from tests.pipeline.conftest import FakeLLM, Reply

HISTORY = [
    {"role": "system", "content": "You help with orders."},
    {"role": "user", "content": "My order 4417 from Acme Outdoor has not arrived."},
    {"role": "assistant", "content": "Order 4417 shipped on March 3 with Nordpost."},
    {"role": "user", "content": "Maria Lopez promised a refund of 129.50 dollars."},
    {"role": "assistant", "content": "I will check with Maria Lopez."},
    {"role": "user", "content": "Thanks. Any news?"},
    {"role": "assistant", "content": "Not yet."},
    {"role": "user", "content": "When will I know?"},
]
FAITHFUL = (
    "The user's order 4417 from Acme Outdoor has not arrived; it shipped on March 3 with Nordpost. "
    "Maria Lopez promised a refund of 129.50 dollars."
)
RATES = Rates(prefill_tokens_per_s=1000.0, s_per_output_token=0.01)


def compress(server: FakeLLM, summary: str, **cfg: object):
    async def go():
        small = LLMClient(server.url, "small")
        c = Compressor(
            small,
            CompressionConfig(
                **{"mode": "on", "min_prompt_tokens": 10, "keep_last": 3, "summary_tokens": 16, **cfg}
            ),
        )
        try:
            return await c.run(HISTORY, RATES, lambda: 5.0), c.stats
        finally:
            await small.aclose()

    server.reset(default=Reply(content=summary))
    return asyncio.run(go())


def test_a_summary_dropping_a_number_is_rejected_and_the_fallback_used(llm_server: FakeLLM) -> None:
    out, stats = compress(llm_server, FAITHFUL.replace("129.50", "some"))
    assert out.used == "fallback" and out.validation is not None and "129.50" in out.validation.missing
    assert out.messages == [HISTORY[0], HISTORY[1], *HISTORY[-3:]]
    assert stats.validation_failures["missing_facts"] == 1 and stats.results["fallback"] == 1
    sent = llm_server.requests[0]
    assert sent["model"] == "small" and "4417" in sent["messages"][1]["content"] and sent["timeout"] <= 5.0


def test_a_summary_dropping_a_name_is_rejected(llm_server: FakeLLM) -> None:
    out, _ = compress(llm_server, FAITHFUL.replace("Maria Lopez", "an agent"))
    assert out.used == "fallback" and "Maria Lopez" in out.validation.missing  # type: ignore[union-attr]


def test_a_faithful_summary_replaces_the_older_turns(llm_server: FakeLLM) -> None:
    out, stats = compress(llm_server, FAITHFUL)
    assert out.used == "summary" and stats.decisions["compress"] == 1
    assert out.messages[0] == HISTORY[0] and FAITHFUL in out.messages[1]["content"]
    assert out.messages[2:] == HISTORY[-3:]


def test_short_prompts_are_never_compressed(llm_server: FakeLLM) -> None:
    out, stats = compress(llm_server, FAITHFUL, min_prompt_tokens=10_000)
    assert out.used == "none" and out.messages == HISTORY and stats.decisions["below_threshold"] == 1
    assert llm_server.requests == []


def test_auto_compresses_only_when_it_pays(llm_server: FakeLLM) -> None:
    # at 1000 tokens/s the ~55 older tokens save ~0.04 s, and summarising them costs more than that
    out, stats = compress(llm_server, FAITHFUL, mode="auto")
    assert out.used == "none" and stats.decisions["not_worth"] == 1 and llm_server.requests == []
