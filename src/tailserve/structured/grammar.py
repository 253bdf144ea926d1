"""JSON-schema grammars compiled to per-token masks with llguidance, off the engine thread.

llguidance was chosen by measurement (BENCHMARKS.md, "Structured outputs"): both it and xgrammar
compile these schemas in milliseconds and fill a 49152-token mask in microseconds, but xgrammar
accepts `not`, `if`/`then`, `dependentRequired` and `uniqueItems` and then does not enforce them,
while llguidance refuses them by name, which becomes the 400 the client reads.

A `Grammar` is compiled once per schema (cached, shared by concurrent requests for the same schema);
each sequence gets its own `Matcher` (a cheap copy) that fills its row of the step's token bitmask and
advances by the token sampled.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("tailserve.structured")

# Compact, single-line JSON with the spacing models saw in training; free whitespace lets a small model
# wander into endless blank lines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INSTALL_HINT = "structured outputs need the optional extra: pip install 'tailserve[structured]'"


class GrammarError(ValueError):
    """A schema that cannot be compiled or enforced; the message says why (a 400 at the API)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain the output to: a JSON schema (its JSON text) or an llguidance lark grammar;
    `key` is the compile cache's key."""

    key: str
    kind: str = "json"  # json | lark

    @classmethod
    def lark(cls, grammar: str) -> GrammarSpec:
        return cls("lark:" + grammar, "lark")

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        try:
            # Key order kept: the grammar writes properties in the order the schema lists them.
            return cls(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None

    @classmethod
    def json_object(cls) -> GrammarSpec:
        """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"})


@dataclass
class Vocabulary:
    """What a grammar engine needs of a tokenizer: each token's bytes and the end tokens."""

    tokens: list[bytes]
    eos_token_ids: list[int]
    special_token_ids: list[int]
    bos_token_id: int | None
    encode: Callable[[str], list[int]]

    @classmethod
    def of_tokenizer(cls, tokenizer: Any) -> Vocabulary:
        return cls(
            tokens=tokenizer.token_bytes(),
            eos_token_ids=sorted(tokenizer.eos_token_ids),
            special_token_ids=tokenizer.special_token_ids,
            bos_token_id=tokenizer.bos_token_id,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        )

    @classmethod
    def of_bytes(cls, size: int, eos_token_ids: list[int]) -> Vocabulary:
        """Token t is byte t (tiny test models), except the end tokens."""
        tokens = [b"" if t in eos_token_ids else bytes([t]) for t in range(size)]
        return cls(tokens, sorted(eos_token_ids), sorted(eos_token_ids), None, lambda s: list(s.encode()))


class _Wrapper:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.tokens = vocab.tokens
        self.eos_token_id = vocab.eos_token_ids[0]
        self.bos_token_id = vocab.bos_token_id
        self.special_token_ids = vocab.special_token_ids
        self._encode = vocab.encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size  # the bitmask's row holds at least this many bits

    def fill(self, mask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into row `row` of a C-contiguous int32 bitmask.

        Straight to llguidance's pointer API, as `llguidance.numpy` does (`llguidance.torch` would
        import torch and torch.compile's machinery, ~1.4 s, at the first request)."""
        _check_bitmask(mask)
        self._m.unsafe_compute_mask_ptr(mask[row].ctypes.data, mask.shape[1] * 4)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next, without consuming it: about a microsecond, against tens
        to hundreds for a whole mask (engine/masks.py samples first and checks with this)."""
        return self._m.validate_tokens([token]) == 1

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (not even an end token)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


def _check_bitmask(mask: np.ndarray) -> None:
    import numpy as np  # here, not at the top: the gateway imports this module for its request checks

    if (
        not isinstance(mask, np.ndarray)
        or mask.dtype != np.int32
        or mask.ndim != 2
        or not mask.flags.c_contiguous
    ):
        raise ValueError("the token bitmask must be a C-contiguous int32 [rows, words] numpy array")


def fill_masks(matchers: list[Matcher], mask: np.ndarray) -> None:
    """Row k of `mask` ([len(matchers), words(vocab)] int32, contiguous) ← what matcher k allows next.

    One llguidance call for the batch, so the GIL is dropped and retaken once: a loop retakes it after
    every row, and while the engine thread runs Python each retake may wait out the interpreter's
    switch interval (5 ms). A batch that fails (one broken matcher) is redone row by row, so that only
    the broken row is left all-allowed; its accept() then ends its request."""
    if not matchers:
        return
    _check_bitmask(mask)
    try:
        _executor().unsafe_compute_mask_ptr(
            [(m._m, k) for k, m in enumerate(matchers)], mask.ctypes.data, mask.shape[1] * 4, mask.shape[0]
        )
    except Exception:
        for k, m in enumerate(matchers):
            try:
                m.fill(mask, k)
            except Exception:
                mask[k] = -1
                log.exception("token mask of row %d failed", k)


@functools.cache
def _executor() -> Any:
    """llguidance's batch mask filler, one thread: the masks are filled beside the engine thread, not
    across the cores the model's step uses (two threads measured slower on 2 cores)."""
    import llguidance

    return llguidance.LLExecutor(num_threads=1)


class Grammar:
    """A compiled grammar: a fresh matcher per sequence."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._template = matcher
        self.vocab_size = vocab_size

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles specs on its own threads (llguidance drops the GIL while compiling), caches by spec,
    and gives up waiting after `timeout` seconds with a GrammarError."""

    def __init__(
        self,
        vocab: Vocabulary | Callable[[], Vocabulary],
        *,
        timeout: float = 10.0,
        workers: int = 2,
        cache_size: int = 256,
    ) -> None:
        try:
            import llguidance
        except ImportError:
            raise GrammarError(INSTALL_HINT) from None
        self._ll = llguidance
        self.timeout = timeout
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tailserve-grammar")
        self._cache: OrderedDict[str, Future[Grammar]] = OrderedDict()
        self._lock = threading.Lock()
        # The vocabulary's preparation (~0.3 s for 49k tokens) starts now, off the caller's thread.
        self._tokenizer = self._pool.submit(self._prepare, vocab)

    def _prepare(self, vocab: Vocabulary | Callable[[], Vocabulary]) -> Any:
        v = vocab if isinstance(vocab, Vocabulary) else vocab()
        ll = self._ll
        tokenizer = ll.LLTokenizer(
            ll.TokenizerWrapper(_Wrapper(v)), n_vocab=len(v.tokens), eos_token=v.eos_token_ids
        )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.result().vocab_size

    def wait_prepared(self) -> None:
        """Until the vocabulary is prepared (or its preparation failed: a compile will say why)."""
        wait([self._tokenizer])

    def submit(self, spec: GrammarSpec) -> Future[Grammar]:
        """The spec's compilation, started now unless it is cached or running."""
        with self._lock:
            fut = self._cache.get(spec.key)
            if fut is None:
                fut = self._cache[spec.key] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec.key)
            return fut

    def compile(self, spec: GrammarSpec) -> Grammar:
        """Blocking form of `compile_async` (tests, offline use)."""
        try:
            return self.submit(spec).result(timeout=self.timeout)
        except TimeoutError:
            raise self._timed_out() from None

    async def compile_async(self, spec: GrammarSpec) -> Grammar:
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self.submit(spec))), self.timeout
            )
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    def _timed_out(self) -> GrammarError:
        return GrammarError(
            f"compiling the JSON schema took longer than {self.timeout:g} s; simplify it "
            "(deeply nested anyOf/oneOf are the usual cause)"
        )

    def _compile(self, spec: GrammarSpec) -> Grammar:
        ll = self._ll
        tokenizer = self._tokenizer.result()
        try:
            if spec.kind == "lark":
                grammar = ll.LLMatcher.grammar_from_lark(spec.key.removeprefix("lark:"))
            else:
                grammar = ll.LLMatcher.grammar_from_json_schema(spec.key, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        matcher = ll.LLMatcher(tokenizer, grammar, log_level=0)
        # llguidance builds parts of a grammar lazily, at its first mask: done here, within the compile
        # limit and off the engine thread.
        matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be enforced: {_first_line(matcher.get_error())}")
        return Grammar(matcher, tokenizer.vocab_size)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
