"""Prompt compression that is validated and used only where it pays: the pure policy.

Older turns are summarised by a small model; the summary is accepted only if every number, name, date
and quoted string of the original survives in it and most of its words come from the original (an
extractive-overlap check, against a summariser that invents). A rejected summary falls back to the
first turn plus the last N turns, never to blind truncation of the middle of a message. Whether to
compress at all is a comparison of times: the prefill the removed tokens would cost at the server's
measured rate, against what the summary costs (nothing when it is already cached). Everything here
is a pure function of plain data; `compressor.py` does the calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december|"
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
)
_DATE = re.compile(
    rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b"
    rf"|\b(?:{_MONTHS})\.? \d{{1,2}}(?:st|nd|rd|th)?(?:,? \d{{4}})?\b"
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)? (?:{_MONTHS})(?: \d{{4}})?\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*%?")
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”")
_CAPITALISED = re.compile(r"\b[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)*")
_WORD = re.compile(r"[a-z0-9]+")
# Capitalised words that are not names: sentence openers and the pronoun.


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_NOT_NAMES = _wordset(
    "i a an the this that these those it its he she they we you my your our their his her what when "
    "where which who why how yes no please thanks thank hello hi ok okay and but or so if then also "
    "can could would should will do does did is are was were be been user assistant summary"
)
_STOPWORDS = _wordset(
    "a an the of and or to in on at for with by from is are was were be been it this that as not "
    "but so if then than also its their his her they we you i he she them our your my about into"
)


def approx_tokens(text: str) -> int:
    """Tokens guessed from characters (about 4 a token for English BPE), as admission guesses."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


@dataclass(frozen=True)
class Facts:
    numbers: frozenset[str]
    names: frozenset[str]
    dates: frozenset[str]
    quotes: frozenset[str]


def _numbers(text: str) -> set[str]:
    return {m.group(0).rstrip(".,") for m in _NUMBER.finditer(text)}


def facts(text: str) -> Facts:
    """The things a summary must keep: numbers, names (capitalised words, except a lone one opening a
    sentence, and runs of them), dates and quoted strings."""
    dates = {m.group(0) for m in _DATE.finditer(text)}
    undated = _DATE.sub(" ", text)
    quotes = {(m.group(1) or m.group(2)).strip() for m in _QUOTED.finditer(text)}
    names: set[str] = set()
    for m in _CAPITALISED.finditer(undated):
        before = undated[: m.start()].rstrip()
        words = m.group(0).split()
        if len(words) == 1 and (not before or before[-1] in '.!?:\n"“'):
            continue  # one capitalised word opening a sentence is usually no name
        words = [w for w in words if w.lower() not in _NOT_NAMES]
        if words:
            names.add(" ".join(words))
    return Facts(frozenset(_numbers(undated)), frozenset(names), frozenset(dates), frozenset(quotes))


def overlap(summary: str, original: str) -> float:
    """Share of the summary's content words that occur in the original (1.0: nothing invented)."""
    said = [w for w in _WORD.findall(summary.lower()) if w not in _STOPWORDS]
    if not said:
        return 0.0
    known = set(_WORD.findall(original.lower()))
    return sum(w in known for w in said) / len(said)


@dataclass(frozen=True)
class Validation:
    ok: bool
    missing: tuple[str, ...]  # facts of the original absent from the summary
    overlap: float
    reason: str  # ok | missing_facts | low_overlap | empty


def validate(original: str, summary: str, min_overlap: float = 0.6) -> Validation:
    """Accept a summary only if every fact of `original` is in it and its overlap is high enough."""
    if not summary.strip():
        return Validation(False, (), 0.0, "empty")
    want = facts(original)
    low = summary.lower()
    have_numbers = _numbers(_DATE.sub(" ", summary)) | _numbers(summary)
    missing = [n for n in sorted(want.numbers) if n not in have_numbers]
    missing += [x for x in sorted(want.names | want.dates | want.quotes) if x.lower() not in low]
    ov = overlap(summary, original)
    if missing:
        return Validation(False, tuple(missing), ov, "missing_facts")
    if ov < min_overlap:
        return Validation(False, (), ov, "low_overlap")
    return Validation(True, (), ov, "ok")


def content_text(m: dict[str, Any]) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else ""


def split_history(
    messages: Sequence[dict[str, Any]], keep_last: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(leading system messages, older turns to compress, the last `keep_last` turns kept as is)."""
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    body = list(messages[head:])
    cut = max(0, len(body) - keep_last)
    return list(messages[:head]), body[:cut], body[cut:]


def render_turns(turns: Sequence[dict[str, Any]]) -> str:
    """Turns as plain text, the summariser's input and what its summary is validated against."""
    return "\n".join(f"{m.get('role', 'user')}: {content_text(m)}" for m in turns)


def fallback(messages: Sequence[dict[str, Any]], keep_last: int) -> list[dict[str, Any]]:
    """The system messages, the first turn (it usually states the task) and the last `keep_last`."""
    system, older, recent = split_history(messages, keep_last)
    return [*system, *older[:1], *recent]


def with_summary(messages: Sequence[dict[str, Any]], keep_last: int, summary: str) -> list[dict[str, Any]]:
    """The conversation with its older turns replaced by one system message carrying the summary."""
    system, _, recent = split_history(messages, keep_last)
    note = {"role": "system", "content": f"Summary of the earlier conversation: {summary.strip()}"}
    return [*system, note, *recent]


@dataclass(frozen=True)
class Decision:
    compress: bool
    reason: str  # compress | below_threshold | nothing_old | no_rate | not_worth
    saved_s: float  # prefill time the removed tokens would have cost
    cost_s: float  # what producing the summary costs (0 when cached)


def decide(
    prompt_tokens: int,
    older_tokens: int,
    prefill_tokens_per_s: float | None,
    summary_tokens: int,
    cost_s: float,
    min_prompt_tokens: int,
) -> Decision:
    """Compress only above `min_prompt_tokens`, and only when the prefill saved — the older turns'
    tokens less the summary's, at the server's measured prefill rate — exceeds `cost_s`."""
    if prompt_tokens < min_prompt_tokens:
        return Decision(False, "below_threshold", 0.0, cost_s)
    if older_tokens <= summary_tokens:
        return Decision(False, "nothing_old", 0.0, cost_s)
    if not prefill_tokens_per_s or prefill_tokens_per_s <= 0:
        return Decision(False, "no_rate", 0.0, cost_s)
    saved = (older_tokens - summary_tokens) / prefill_tokens_per_s
    if saved <= cost_s:
        return Decision(False, "not_worth", saved, cost_s)
    return Decision(True, "compress", saved, cost_s)


def summary_cost(
    older_tokens: int, summary_tokens: int, small_prefill_tokens_per_s: float, small_s_per_output_token: float
) -> float:
    """Seconds the small tier needs to read the older turns and write the summary."""
    if small_prefill_tokens_per_s <= 0:
        return math.inf
    return older_tokens / small_prefill_tokens_per_s + summary_tokens * small_s_per_output_token
