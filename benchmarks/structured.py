"""Grammar libraries compared on the default model's vocabulary: xgrammar vs llguidance.

For each library: the one-off vocabulary preparation, the cold compile time of a few JSON schemas
(best of --repeat, nothing cached), and the per-step cost of the token mask while walking a valid
instance token by token (fill the bitmask, then accept the token), plus applying the mask to rows of
logits (numpy, as the engine does). xgrammar's own C++ warnings go to stderr.
Run under `flock /work/bench.lock`; the figures go to BENCHMARKS.md.

    python benchmarks/structured.py [--model PATH] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from harness import quantile

from tailserve.tokenizer import Tokenizer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"enum": ["open", "paid", "shipped"]},
        "note": {"type": "string"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["name"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer"},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
            },
        },
    },
    "required": ["id", "status", "customer", "items"],
}


def nested_one_of(depth: int) -> dict:
    """The shape that makes compile time explode elsewhere (vLLM #54003): oneOf nested `depth` deep."""
    node: dict = {"type": "string"}
    for i in range(depth):
        node = {
            "oneOf": [
                {"type": "object", "properties": {f"a{i}": node, f"b{i}": {"type": "integer"}}},
                {"type": "array", "items": node},
            ]
        }
    return node


SCHEMAS = {
    "person": (PERSON, {"name": "Ada Lovelace", "age": 36}),
    "order": (
        ORDER,
        {
            "id": 1042,
            "status": "paid",
            "customer": {"name": "Grace Hopper", "email": None},
            "items": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-22", "qty": 1, "price": 120.0}],
        },
    ),
    "oneOf-depth-6": (nested_one_of(6), {"a5": [{"a3": [[["s"]]]}]}),
    "any-json": (None, {"k": [1, 2.5, "s", None, True, {"x": {}}]}),
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo(
            tok.token_bytes(),
            xgr.VocabType.RAW,
            vocab_size=vocab_size,
            stop_token_ids=sorted(tok.eos_token_ids),
        )
        self.vocab_size = vocab_size

    def compile(self, schema: dict | None):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if schema is None:
            return compiler.compile_builtin_json_grammar()
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t), f"xgrammar rejected token {t}"
        return times


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, vocab_size: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tok)), n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict | None):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema or {},
            defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        )
        matcher = self.ll.LLMatcher(self.tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar, matcher

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        import llguidance.torch as llt

        matcher = self.ll.LLMatcher(self.tok, compiled[0])
        mask = llt.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), f"llguidance rejected token {t}: {matcher.get_error()}"
        return times


class _Vocab:
    """What llguidance's TokenizerWrapper reads off a tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.tokens = tok.token_bytes()
        self.eos_token_id = min(tok.eos_token_ids)
        self.bos_token_id = tok.bos_token_id
        self.special_token_ids = tok.special_token_ids

    def __call__(self, text: bytes | str) -> list[int]:
        s = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self.tok.encode(s, add_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=str(Path.home() / ".cache/tailserve/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.load(Path(args.model))
    vocab = tok.vocab_size
    print(f"model {Path(args.model).name}: vocabulary {vocab} tokens")
    for lib_cls in (XGrammar, LLGuidance):
        t0 = time.perf_counter()
        try:
            lib = lib_cls(tok, vocab)
        except ImportError as e:
            print(f"\n{lib_cls.name}: not installed ({e}); `pip install xgrammar==0.2.8 llguidance==1.9.1`")
            continue
        print(f"\n{lib.name}: vocabulary preparation {1e3 * (time.perf_counter() - t0):.0f} ms")
        print(
            f"  {'schema':<16}{'compile ms':>11}{'steps':>7}"
            f"{'mask p50 us':>13}{'mask p99 us':>13}{'mean us':>9}"
        )
        for name, (schema, instance) in SCHEMAS.items():
            compile_s = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                compiled = lib.compile(schema)
                compile_s.append(time.perf_counter() - t0)
            text = json.dumps(instance)
            tokens = [*tok.encode(text, add_special_tokens=False), min(tok.eos_token_ids)]
            steps: list[float] = []
            for _ in range(args.repeat):
                steps += lib.walk(compiled, tokens)
            print(
                f"  {name:<16}{1e3 * min(compile_s):>11.1f}{len(tokens):>7}"
                f"{1e6 * quantile(steps, 0.5):>13.0f}{1e6 * quantile(steps, 0.99):>13.0f}"
                f"{1e6 * statistics.fmean(steps):>9.0f}"
            )
    from tailserve.structured.bitmask import to_bias

    mask = np.zeros((16, (vocab + 31) // 32), dtype=np.int32)
    mask[:, :10] = -1
    batch = np.random.default_rng(0).standard_normal((16, vocab), dtype=np.float32)

    def unpack_and_fill(rows: int) -> None:  # the engine's way before engine/masks.py
        bits = np.unpackbits(mask[:rows].view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        np.copyto(batch[:rows], -np.inf, where=bits == 0)

    for rows in (1, 16):
        bias = to_bias(mask[:rows], vocab, vocab)
        ways = {
            "unpack bits + fill -inf": lambda r=rows: unpack_and_fill(r),
            "to_bias (mask thread)": lambda r=rows: to_bias(mask[:r], vocab, vocab),
            "add the bias (engine thread)": lambda r=rows, b=bias: np.add(batch[:r], b, out=batch[:r]),
        }
        for what, fn in ways.items():
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(f"{rows:>2} rows, {what:<30} p50 {1e6 * quantile(times, 0.5):6.0f} us")


if __name__ == "__main__":
    main()
