"""The compression stage: decide (compress.decide), summarise the older turns with the small tier,
validate (compress.validate), fall back to first + last turns when the summary fails. Summaries are
cached by the older turns' text (rejected ones too: validation is rerun, the model is not), so a
conversation pays for one once, and a cached one costs nothing in the decision. Every decision and
validation failure is counted (`stats`)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tailserve.pipeline import compress
from tailserve.pipeline.cache import TTLCache
from tailserve.pipeline.llm import LLMClient
from tailserve.pipeline.rates import Rates

SUMMARY_PROMPT = (
    "Summarise the conversation below in a few sentences. Keep every number, name, date and quoted "
    "string exactly as written. Write only the summary."
)


@dataclass(frozen=True)
class CompressionConfig:
    mode: str = "auto"  # off | auto (when it pays) | on (whenever above the threshold)
    min_prompt_tokens: int = 1024
    keep_last: int = 4  # turns kept verbatim (and, on fallback, after the first turn)
    summary_tokens: int = 96
    min_overlap: float = 0.6


@dataclass
class CompressionStats:
    decisions: Counter[str] = field(default_factory=Counter)  # by Decision.reason
    results: Counter[str] = field(default_factory=Counter)  # summary | fallback
    validation_failures: Counter[str] = field(default_factory=Counter)  # by Validation.reason


@dataclass(frozen=True)
class Compressed:
    messages: list[dict[str, Any]]
    decision: compress.Decision
    used: str  # none | summary | fallback
    validation: compress.Validation | None = None


class Compressor:
    def __init__(self, small: LLMClient, config: CompressionConfig, cache: TTLCache | None = None) -> None:
        self.small = small
        self.config = config
        self.cache = cache
        self.stats = CompressionStats()

    def _decide(self, messages: list[dict[str, Any]], rates: Rates, cached: bool) -> compress.Decision:
        cfg = self.config
        _, older, _ = compress.split_history(messages, cfg.keep_last)
        total = sum(compress.approx_tokens(compress.content_text(m)) for m in messages)
        older_tokens = compress.approx_tokens(compress.render_turns(older)) if older else 0
        if cfg.mode == "on":
            rate = rates.prefill_tokens_per_s or 1.0  # "on" compresses whatever the measured rate
            return compress.decide(total, older_tokens, rate, cfg.summary_tokens, 0.0, cfg.min_prompt_tokens)
        cost = 0.0
        if not cached:
            cost = compress.summary_cost(
                older_tokens,
                cfg.summary_tokens,
                rates.prefill_tokens_per_s or 0.0,
                rates.s_per_output_token or 0.0,
            )
        return compress.decide(
            total, older_tokens, rates.prefill_tokens_per_s, cfg.summary_tokens, cost, cfg.min_prompt_tokens
        )

    async def run(
        self, messages: list[dict[str, Any]], rates: Rates, time_left: Callable[[], float]
    ) -> Compressed:
        cfg = self.config
        _, older, _ = compress.split_history(messages, cfg.keep_last)
        original = compress.render_turns(older)
        key = hashlib.sha256(original.encode()).hexdigest()
        summary = self.cache.get(key) if self.cache is not None and older else None
        decision = self._decide(messages, rates, summary is not None)
        self.stats.decisions[decision.reason] += 1
        if not decision.compress:
            return Compressed(messages, decision, "none")
        if summary is None:
            reply = await self.small.chat(
                [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": original}],
                time_left(),
                max_tokens=cfg.summary_tokens,
                temperature=0.0,
            )
            summary = reply.content
            if self.cache is not None:  # kept even when it fails: the same turns would fail again
                self.cache.put(key, summary)
        check = compress.validate(original, summary, cfg.min_overlap)
        if not check.ok:
            self.stats.validation_failures[check.reason] += 1
            self.stats.results["fallback"] += 1
            return Compressed(compress.fallback(messages, cfg.keep_last), decision, "fallback", check)
        self.stats.results["summary"] += 1
        return Compressed(compress.with_summary(messages, cfg.keep_last, summary), decision, "summary", check)
