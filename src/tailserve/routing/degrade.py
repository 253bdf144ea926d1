"""Degrade under load: a request routed to a tier that cannot give its first token within the request's
TTFT SLO goes to the next tier of the degrade order that can.

A tier's predicted TTFT is the best over its backends that take requests now. Per backend, from the
signals it has (all plain numbers, so the gateway's own counts and whatever a backend publishes feed
the same rule):
- `published_ttft`: the backend's own prediction (its admission headers or load endpoint);
- `overhead + (queued_tokens + prompt_tokens) / prefill_rate`: the prompt tokens this gateway already
  sent it and not yet answered, plus this request's, at the rate it was measured to clear them, after
  the fixed time every first token takes (scheduling, the hop, the first step).
With both, the larger: each is a lower bound of the truth — the published figure is up to a poll
old and misses a burst sent since (a burst of 16 arriving together all read the idle figure of before
it, and none degraded), and the gateway's own count misses other clients' requests. With neither,
unknown, which counts as meeting the SLO: no evidence of overload is no reason to degrade.

`PrefillMeter` is that measurement, kept by the caller per backend: it counts the tokens outstanding
and fits `TTFT ≈ overhead + tokens ahead / rate` to the first tokens it sees (exponentially weighted
least squares, as the engine's step-time model). A rate alone (tokens over TTFT) mispredicts across
prompt sizes: short prompts' TTFTs are mostly overhead, so they make a fast backend look slow.
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
    overhead: float = 0.0  # seconds every first token takes, whatever the tokens ahead


def predicted_ttft(signal: TtftSignal, prompt_tokens: float) -> float | None:
    known = [] if signal.published_ttft is None else [signal.published_ttft]
    if signal.prefill_rate:
        known.append(signal.overhead + (signal.queued_tokens + prompt_tokens) / signal.prefill_rate)
    return max(known) if known else None


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
    late: float | None = None  # the chosen tier's predicted TTFT, when even it is over the SLO


def degrade(
    tier: str, order: Sequence[str], predicted: Mapping[str, float | None], slo: float
) -> DegradeChoice:
    """The tier to use for a request routed to `tier` with TTFT SLO `slo` seconds. Only tiers after
    `tier` in `order` are candidates; the first that meets the SLO wins, else the one predicted
    fastest, marked `late` with its prediction (the caller may shed the request: no tier can meet its
    SLO). A tier not in `order` never degrades."""
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
    return DegradeChoice(best, reason if best != tier else None, predicted.get(best))


@dataclass
class PrefillMeter:
    """One backend's outstanding prompt tokens, and `TTFT ≈ overhead + ahead / rate` fitted to its first
    tokens (weighted means of x, y, x², xy; each new sample weighs `alpha`)."""

    alpha: float = 0.1
    queued_tokens: float = 0.0
    samples: int = 0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def sent(self, tokens: float) -> float:
        """A request of `tokens` was sent; returns the tokens it waits behind, itself included."""
        self.queued_tokens += tokens
        return self.queued_tokens

    def first_token(self, ahead: float, seconds: float) -> None:
        """A first token came `seconds` after sending a request that had `ahead` tokens to clear."""
        if seconds <= 0 or ahead <= 0:
            return
        a = 1.0 if self.samples == 0 else self.alpha
        self._x += a * (ahead - self._x)
        self._y += a * (seconds - self._y)
        self._xx += a * (ahead * ahead - self._xx)
        self._xy += a * (ahead * seconds - self._xy)
        self.samples += 1

    def fit(self) -> tuple[float, float] | None:
        """(overhead seconds, tokens per second), or None before any sample. With too little spread in
        the tokens ahead to separate the two, all of the time is put on the tokens (overhead 0)."""
        if not self.samples:
            return None
        var = self._xx - self._x * self._x
        if var > (0.1 * self._x) ** 2:
            per_token = (self._xy - self._x * self._y) / var
            overhead = self._y - per_token * self._x
            if per_token > 0 and overhead >= 0:
                return overhead, 1.0 / per_token
        return 0.0, self._x / self._y

    @property
    def rate(self) -> float | None:
        fit = self.fit()
        return None if fit is None else fit[1]

    def done(self, tokens: float) -> None:
        """A request's tokens no longer wait (its first token came, or it ended without one)."""
        self.queued_tokens = max(0.0, self.queued_tokens - tokens)

    def signal(self, available: bool, published_ttft: float | None) -> TtftSignal:
        fit = self.fit()
        if fit is None:
            return TtftSignal(available, self.queued_tokens, None, published_ttft)
        return TtftSignal(available, self.queued_tokens, fit[1], published_ttft, fit[0])
