"""Degrade under load: a request routed to a tier that cannot give its first token within the request's
TTFT SLO goes to the next tier of the degrade order that can.

A tier's predicted TTFT is the best over its backends that take requests now. Per backend, from the
most direct signal it has (all plain numbers, so the gateway's own counts and whatever a backend
publishes feed the same rule):
1. `published_ttft`: the backend's own prediction (its admission headers or load endpoint);
2. else `(queued_tokens + prompt_tokens) / prefill_rate`: the prompt tokens already sent to it and not
   yet answered, plus this request's, at the rate it was measured to clear them;
3. else unknown, which counts as meeting the SLO: no evidence of overload is no reason to degrade.

`PrefillMeter` is that measurement, kept by the caller per backend: it counts the tokens outstanding
and turns each first token into a rate sample (tokens that were ahead of it, over its TTFT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 4.0  # the prompt-size estimate before tokenizing (as the server's admission does)


@dataclass(frozen=True)
class TtftSignal:
    """What predicts one backend's TTFT for a new request."""

    available: bool = True
    queued_tokens: float = 0.0
    prefill_rate: float | None = None  # prompt tokens per second, measured
    published_ttft: float | None = None


def predicted_ttft(signal: TtftSignal, prompt_tokens: float) -> float | None:
    if signal.published_ttft is not None:
        return signal.published_ttft
    if signal.prefill_rate:
        return (signal.queued_tokens + prompt_tokens) / signal.prefill_rate
    return None


def tier_ttft(signals: Sequence[TtftSignal], prompt_tokens: float) -> float | None:
    """The tier's best predicted TTFT; +inf when no backend takes requests; None when unknown."""
    up = [s for s in signals if s.available]
    if not up:
        return float("inf")
    known = [p for s in up if (p := predicted_ttft(s, prompt_tokens)) is not None]
    return min(known) if len(known) == len(up) else None


@dataclass(frozen=True)
class DegradeChoice:
    tier: str
    reason: str | None  # None: not degraded; "ttft_slo" (predicted over the SLO); "unavailable"


def degrade(
    tier: str, order: Sequence[str], predicted: Mapping[str, float | None], slo: float
) -> DegradeChoice:
    """The tier to use for a request routed to `tier` with TTFT SLO `slo` seconds. Only tiers after
    `tier` in `order` are candidates; the first that meets the SLO wins, else the one predicted
    fastest. A tier not in `order` never degrades."""
    mine = predicted.get(tier)
    if tier not in order or mine is None or mine <= slo:
        return DegradeChoice(tier, None)
    reason = "unavailable" if mine == float("inf") else "ttft_slo"
    rest = list(order[order.index(tier) + 1 :])
    for t in rest:
        p = predicted.get(t)
        if p is None or p <= slo:
            return DegradeChoice(t, reason)
    best = min([tier, *rest], key=lambda t: predicted.get(t) or 0.0)
    return DegradeChoice(best, reason if best != tier else None)


@dataclass
class PrefillMeter:
    """One backend's outstanding prompt tokens and its measured prefill rate (an EWMA of samples)."""

    alpha: float = 0.2
    queued_tokens: float = 0.0
    rate: float | None = None

    def sent(self, tokens: float) -> float:
        """A request of `tokens` was sent; returns the tokens it waits behind, itself included."""
        self.queued_tokens += tokens
        return self.queued_tokens

    def first_token(self, ahead: float, seconds: float) -> None:
        """A first token came `seconds` after sending a request that had `ahead` tokens to clear."""
        if seconds <= 0 or ahead <= 0:
            return
        sample = ahead / seconds
        self.rate = sample if self.rate is None else (1 - self.alpha) * self.rate + self.alpha * sample

    def done(self, tokens: float) -> None:
        """A request's tokens no longer wait (its first token came, or it ended without one)."""
        self.queued_tokens = max(0.0, self.queued_tokens - tokens)

    def signal(self, available: bool, published_ttft: float | None) -> TtftSignal:
        return TtftSignal(available, self.queued_tokens, self.rate, published_ttft)
