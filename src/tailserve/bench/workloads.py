"""Seeded, deterministic workloads: the same name, size and seed always give the same prompts.

Text is synthetic (sentences drawn from a built-in word list), so nothing is downloaded and the
prompts do not depend on any model. Lengths are in *approx tokens*: words x TOKENS_PER_WORD, which
the server's reported usage replaces in the results.

A workload is a list of sessions; a session is a list of turns sent one after another, each turn
carrying the whole history so far (single-turn workloads have one turn per session). Arrivals
(closed loop, Poisson, bursts) are a property of the run, not of the workload.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

# Calibrated on SmolLM2's BPE over this word list (about 1.1 tokens per word with punctuation).
TOKENS_PER_WORD = 1.1

WORKLOADS = (
    "chat", "straggler", "multiturn", "burst", "copy", "disconnect", "oversized", "slowreader", "pipeline",
)  # fmt: skip

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what up out "
    "about who into them can more some time could these two may then first any like other over such "
    "our new only also after most made many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last "
    "might great old year off come since against go came right used take three system water river "
    "mountain garden window kitchen library engine signal market letter morning evening winter summer "
    "village harbor bridge forest island candle mirror ladder pencil orange silver copper marble "
    "thunder planet lantern compass saddle blanket kettle feather meadow valley canyon glacier "
    "desert harvest festival journey whisper shadow sunlight question answer number pattern reason "
    "history science music theory measure quickly slowly gently rarely always often carefully "
    "brightly quietly loudly early late bright dark warm cold heavy light narrow wide ancient modern"
)
_WORDS = _WORD_TEXT.split()

# Plain sentences for passages a model is asked to quote: small models copy prose faithfully but
# paraphrase word salad, and the copy workload is only what it says when the answer quotes the prompt.
_PROSE = (
    "The city library opens at nine in the morning and closes at six in the evening.",
    "Visitors can borrow up to five books at a time, and each loan lasts three weeks.",
    "The reading room on the second floor is quiet and has large windows that face the park.",
    "To make a simple tomato soup, cook two chopped onions in olive oil until they are soft.",
    "Add six ripe tomatoes, a cup of water and a pinch of salt, then let it simmer for twenty minutes.",
    "Our team meeting is moved to Thursday at two o'clock because the conference room is booked.",
    "Please bring the quarterly report and your notes on the new project.",
    "If you cannot attend, send a short update to Maria before noon.",
    "The train to the coast leaves from platform four every hour.",
    "The journey takes about ninety minutes and passes through three small towns.",
    "Tickets can be bought at the station or online, and children under twelve travel for half price.",
    "Water the tomato plants early in the morning, before the sun is strong.",
    "The museum has a new exhibition of old maps, some of them more than four hundred years old.",
    "A good password is long, easy for you to remember and hard for anyone else to guess.",
    "The bakery on the corner sells fresh bread every day except Monday.",
    "After the storm, the river rose so high that the old bridge was closed for a week.",
    "Remember to switch off the lights and lock the back door when you leave the office.",
    "The course covers the basics of statistics, from averages to simple regression.",
    "Each student will present a short project at the end of the term.",
    "The hotel offers free breakfast, a small gym and a shuttle to the airport.",
    "Our support team answers emails within one working day.",
    "The bike path follows the lake for six miles and then turns north into the forest.",
    "Store the medicine in a cool, dry place and keep it away from children.",
    "The concert starts at eight, and the doors open half an hour earlier.",
    "She planted apple trees along the fence, and after three years they gave their first fruit.",
    "The new software update fixes several bugs and makes the app start faster.",
    "Please read the safety instructions before you use the machine for the first time.",
    "The farmers' market is open on Saturdays from early morning until one in the afternoon.",
    "He wrote a letter to his grandmother every month while he was studying abroad.",
    "The restaurant is closed for renovation and will open again in the spring.",
)

# The pipeline workload: questions for the example assistant (examples/assistant), about its articles.
_SUPPORT_QUESTIONS = (
    "How long does a refund take for order {order}?",
    "Where is my order {order} right now?",
    "Can I exchange the boots from order {order} for a bigger size?",
    "How much does Express shipping cost, and when would order {order} arrive?",
    "Is my tent from order {order} still under warranty?",
    "How many reward points do I have, and what are they worth?",
    "Can I still cancel order {order}?",
    "What do I do if order {order} shows delivered but never came?",
    "Do I pay import duties on an international order?",
    "Which payment methods can I use, and can I pay in instalments?",
    "How do I return a jacket from order {order}?",
    "What are the opening hours of the York store?",
    "How do I wash my waterproof jacket?",
    "Can I rent a tent for a weekend, and is there a deposit?",
    "Does the price match apply to order {order}?",
    "Who should I ask about a refund over 200 dollars?",
)
_PRODUCTS = ("Ridge Pro tent", "trail boots", "rain jacket", "sleeping bag", "camp stove", "backpack")
_PEOPLE = ("Maria Lopez", "Tom Baker", "Priya Shah", "Jonas Berg")
_MONTHS = ("March", "April", "May", "June", "July", "August")

_QUESTIONS = (
    "Explain the following in simple terms.",
    "Summarize the passage below.",
    "What is the main idea here?",
    "Write a short story that continues this.",
    "List three questions about the text below.",
    "Rewrite the following more formally.",
)


def est_tokens(text: str) -> int:
    """Approximate token count of `text` (the words-to-tokens estimate used everywhere here)."""
    return max(1, round(len(text.split()) * TOKENS_PER_WORD))


def synth_text(rng: random.Random, approx_tokens: int) -> str:
    """Sentences of common words totalling about `approx_tokens` tokens."""
    target_words = max(1, round(approx_tokens / TOKENS_PER_WORD))
    sentences: list[str] = []
    n = 0
    while n < target_words:
        k = min(rng.randint(6, 16), target_words - n)
        words = rng.choices(_WORDS, k=k)
        sentences.append(" ".join(words).capitalize() + ".")
        n += k
    return " ".join(sentences)


def prose_text(rng: random.Random, approx_tokens: int) -> str:
    """Plain sentences, none twice in a row, totalling about `approx_tokens` tokens."""
    order: list[str] = []
    while est_tokens(" ".join(order)) < approx_tokens:
        pool = list(_PROSE)
        rng.shuffle(pool)
        order.extend(pool)
    words = " ".join(order).split()
    return " ".join(words[: max(1, round(approx_tokens / TOKENS_PER_WORD))])


@dataclass(frozen=True)
class Turn:
    """One request's user message and how the client treats it."""

    user: str
    max_tokens: int
    tag: str = "normal"  # normal | long | disconnect | oversized | slowreader: results group by it
    disconnect_after: int | None = None  # the client drops the stream after this many tokens
    slow_read: bool = False  # the client reads this stream slowly through a small socket buffer


@dataclass(frozen=True)
class Session:
    turns: tuple[Turn, ...]
    system: str | None = None
    history: tuple[dict[str, str], ...] = ()  # earlier turns sent before the first (pipeline)


@dataclass
class Workload:
    name: str
    sessions: list[Session]
    default_arrival: str = "closed"  # the arrival mode used when none is asked for
    params: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


@dataclass(frozen=True)
class WorkloadParams:
    """The knobs of the workloads; the defaults are what the names promise."""

    output_tokens: int = 128
    system_tokens: int = 400  # chat: the shared system prompt
    system_prompts: int = 1  # chat: distinct system prompts (a prefix-affinity router's keys)
    hot_share: float | None = None  # chat: share of requests on the first one; None: all even
    straggler_every: int = 10  # straggler: every n-th request is the long one
    long_tokens: int = 2048
    turns: tuple[int, int] = (3, 6)  # multiturn: turns per session (inclusive range)
    disconnect_share: float = 0.3
    oversized_share: float = 0.25
    slowreader_every: int = 8
    context_len: int | None = None  # oversized: the server's context length
    history_tokens: int = 0  # pipeline: approx tokens of earlier conversation before each question


def _user_turn(rng: random.Random, lo: int, hi: int) -> str:
    """A question plus a passage of log-uniform length in [lo, hi] approx tokens."""
    n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return f"{rng.choice(_QUESTIONS)}\n\n{synth_text(rng, n)}"


def _pick_system(rng: random.Random, systems: list[str | None], hot_share: float | None) -> str | None:
    """One of `systems`: the first with probability `hot_share`, else one of the others evenly."""
    if len(systems) == 1:
        return systems[0]
    if hot_share is None:
        return rng.choice(systems)
    return systems[0] if rng.random() < hot_share else rng.choice(systems[1:])


def support_history(rng: random.Random, approx_tokens: int) -> tuple[dict[str, str], ...]:
    """An earlier support conversation of about `approx_tokens` tokens, each turn carrying facts (order
    numbers, names, dates, amounts) a faithful summary must keep."""
    turns: list[dict[str, str]] = []
    total = 0
    while total < approx_tokens:
        order = f"TO-{rng.randint(10000, 99999)}"
        fact = (
            f"My order {order} with the {rng.choice(_PRODUCTS)} was placed on {rng.choice(_MONTHS)} "
            f"{rng.randint(1, 28)} and cost {rng.randint(20, 400)} dollars. {rng.choice(_PEOPLE)} from "
            f"support said it would be sorted."
        )
        user = f"{fact} {prose_text(rng, 60)}"
        reply = f"Thank you, I have noted order {order}. {prose_text(rng, 90)}"
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        total += est_tokens(user) + est_tokens(reply)
    return tuple(turns)


def _support_turn(rng: random.Random, out: int) -> Turn:
    question = rng.choice(_SUPPORT_QUESTIONS).format(order=f"TO-{rng.randint(10000, 99999)}")
    return Turn(question, out, tag="pipeline")


def build_workload(name: str, num_requests: int, seed: int, params: WorkloadParams | None = None) -> Workload:
    """`num_requests` requests of workload `name`, fully determined by `seed`."""
    p = params or WorkloadParams()
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if num_requests < 1:
        raise ValueError("the workload needs at least one request")
    rng = random.Random(f"{name}:{seed}")
    out = p.output_tokens
    sessions: list[Session] = []
    if name == "multiturn":
        system = "You are a helpful assistant. Answer briefly and stay on topic."
        left = num_requests
        while left > 0:
            k = min(left, rng.randint(*p.turns))
            turns = tuple(Turn(_user_turn(rng, 32, 160), out) for _ in range(k))
            sessions.append(Session(turns, system))
            left -= k
        return Workload(name, sessions, params={"turns_min": p.turns[0], "turns_max": p.turns[1]})
    if name == "pipeline":
        for _ in range(num_requests):
            history = support_history(rng, p.history_tokens) if p.history_tokens else ()
            sessions.append(Session((_support_turn(rng, out),), None, history))
        return Workload(name, sessions, params={"history_tokens": p.history_tokens})
    if name == "oversized" and not p.context_len:
        raise ValueError("the oversized workload needs the context length (--context-len)")
    system = synth_text(rng, p.system_tokens) if name == "chat" else None
    extra = p.system_prompts - 1 if name == "chat" else 0
    systems = [system] + [synth_text(rng, p.system_tokens) for _ in range(extra)]
    pick = random.Random(f"{name}:{seed}:systems")  # its own stream: the user turns stay the same
    for i in range(num_requests):
        if name == "chat":
            # ~46-token user turns after the ~400-token system prompt: ~450 prompt tokens in all, the
            # shape the peers were measured on (../shared/peers/README.md).
            turn = Turn(_user_turn(rng, 16, 96), out)
        elif name == "straggler":
            if p.straggler_every and i % p.straggler_every == p.straggler_every - 1:
                turn = Turn(f"{_QUESTIONS[0]}\n\n{synth_text(rng, p.long_tokens)}", out, tag="long")
            else:
                turn = Turn(_user_turn(rng, 32, 128), out)
        elif name == "copy":
            passage = prose_text(rng, out)
            turn = Turn(f"Repeat the following passage word for word.\n\n{passage}", out, tag="copy")
        elif name == "disconnect" and rng.random() < p.disconnect_share:
            drop = rng.randint(1, max(1, out // 2))
            turn = Turn(_user_turn(rng, 16, 400), out, tag="disconnect", disconnect_after=drop)
        elif name == "oversized" and rng.random() < p.oversized_share:
            assert p.context_len is not None
            turn = Turn(synth_text(rng, int(p.context_len * 1.5) + 64), out, tag="oversized")
        elif name == "slowreader" and i % p.slowreader_every == 0:
            turn = Turn(_user_turn(rng, 16, 400), out, tag="slowreader", slow_read=True)
        else:  # burst, and the well-behaved share of the unhappy workloads
            turn = Turn(_user_turn(rng, 16, 400), out)
        sessions.append(Session((turn,), _pick_system(pick, systems, p.hot_share)))
    params: dict[str, float | int | None] = {}
    if name == "straggler":
        params = {"straggler_every": p.straggler_every, "long_tokens": p.long_tokens}
    elif name == "disconnect":
        params = {"disconnect_share": p.disconnect_share}
    elif name == "oversized":
        params = {"oversized_share": p.oversized_share, "context_len": p.context_len}
    elif name == "slowreader":
        params = {"slowreader_every": p.slowreader_every}
    elif name == "chat":
        params = {"system_tokens": p.system_tokens, "system_prompts": p.system_prompts}
        if p.hot_share is not None:
            params["hot_share"] = p.hot_share
    return Workload(name, sessions, "burst" if name == "burst" else "closed", params)
