"""Grammar-constrained decoding on tiny random models: whatever the model prefers, the output is JSON
that validates against the schema; unconstrained rows in the same batch are untouched."""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytest.importorskip("llguidance", reason="structured outputs need the 'structured' extra")
jsonschema = pytest.importorskip("jsonschema")

from tailserve.models.llama import LlamaModel  # noqa: E402
from tailserve.sampling import SamplingParams  # noqa: E402
from tailserve.structured import tools  # noqa: E402
from tailserve.structured.grammar import GrammarCompiler, GrammarError, GrammarSpec, Vocabulary  # noqa: E402
from tests.tiny import MODEL_KINDS, TINY, run_all, tiny_engine, tiny_model_of, tiny_weights  # noqa: E402

NAME = {"type": "string", "maxLength": 6}
SMALL_INT = {"type": "integer", "minimum": -50, "maximum": 500}
CLOSED = {"additionalProperties": False}  # open objects let a random model write keys until max_tokens

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": SMALL_INT}, "required": ["name", "age"], **CLOSED},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}}, **CLOSED},
    {
        "type": "object",
        "properties": {"status": {"enum": ["open", "paid", "shipped"]}, "n": SMALL_INT},
        **CLOSED,
    },
    {
        "type": "object",
        "properties": {
            "id": SMALL_INT,
            "owner": {
                "type": "object",
                "properties": {"name": NAME, "email": {"anyOf": [NAME, {"type": "null"}]}},
                "required": ["name", "email"],
                **CLOSED,
            },
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"sku": NAME, "ok": {"type": "boolean"}},
                    "required": ["sku", "ok"],
                    **CLOSED,
                },
            },
        },
        "required": ["id", "owner", "items"],
        **CLOSED,
    },
    {"type": "array", "items": {"anyOf": [SMALL_INT, {"type": "boolean"}, {"type": "null"}]}, "maxItems": 4},
]

EOS = TINY.eos_token_ids


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    c = GrammarCompiler(Vocabulary.of_bytes(TINY.vocab_size, EOS), timeout=30.0)
    yield c
    c.shutdown()


def text_of(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t not in EOS).decode("utf-8")


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_outputs_validate_against_their_schemas(compiler: GrammarCompiler, kind: str) -> None:
    engine = tiny_engine(tiny_model_of(kind))
    prompt = [5, 9, 33, 70, 12]
    want = {}
    for i, schema in enumerate(SCHEMAS):
        grammar = compiler.compile(GrammarSpec.json_schema(schema))
        for seed in (0, 1):
            rid = f"s{i}-{seed}"
            params = SamplingParams(max_tokens=150, temperature=1.0, seed=seed)
            engine.add_request(rid, prompt, params, grammar=grammar)
            want[rid] = schema
    got = run_all(engine)
    for rid, schema in want.items():
        jsonschema.validate(json.loads(text_of(got[rid])), schema)


def test_unconstrained_rows_are_untouched(compiler: GrammarCompiler) -> None:
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    alone = tiny_engine()
    alone.add_request("free", prompt, params)
    expected = run_all(alone)["free"]

    engine = tiny_engine()
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS[0]))
    engine.add_request("free", prompt, params)
    engine.add_request("a", prompt, SamplingParams(max_tokens=150, temperature=0.8, seed=3), grammar=grammar)
    got: dict[str, list[int]] = {}
    for out in engine.step():
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    # Arriving after the prompt's blocks are cached, "b" starts from the prefix cache.
    engine.add_request("b", prompt, SamplingParams(max_tokens=150, temperature=0.8, seed=4), grammar=grammar)
    for rid, tokens in run_all(engine).items():
        got.setdefault(rid, []).extend(tokens)
    assert got["free"] == expected
    for rid in ("a", "b"):
        jsonschema.validate(json.loads(text_of(got[rid])), SCHEMAS[0])
    assert engine.block_manager.prefix_hits > 0
    # Sampled without top-k/top-p, the constrained rows were checked after sampling (engine/masks.py).
    assert engine.masks.stats.lazy_hits > 0 and engine.masks.stats.lazy_misses > 0


def test_json_object_starts_an_object_and_never_errs(compiler: GrammarCompiler) -> None:
    # Any object is unbounded: a random model may still be writing one at max_tokens.
    engine = tiny_engine()
    seq = engine.add_request(
        "o",
        [3, 4, 5],
        SamplingParams(max_tokens=60, temperature=1.0, seed=0),
        grammar=compiler.compile(GrammarSpec.json_object()),
    )
    got = run_all(engine)["o"]
    assert seq.finish_reason in ("stop", "length") and seq.error is None
    assert text_of(got).startswith("{")
    if seq.finish_reason == "stop":
        assert isinstance(json.loads(text_of(got)), dict)


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ],
)
def test_unenforceable_keywords_are_named(compiler: GrammarCompiler, schema: dict, keyword: str) -> None:
    with pytest.raises(GrammarError, match=keyword):
        compiler.compile(GrammarSpec.json_schema(schema))


def test_invalid_schemas_are_refused(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="must be an object"):
        GrammarSpec.json_schema(["type", "object"])
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec.json_schema({"type": "no-such-type"}))


def test_compile_waits_at_most_the_limit_and_caches() -> None:
    c = GrammarCompiler(Vocabulary.of_bytes(TINY.vocab_size, EOS), timeout=0.2, workers=1)
    release = threading.Event()
    try:
        c._pool.submit(release.wait, 10)  # the only compile thread is busy: the compile cannot finish
        spec = GrammarSpec.json_schema({"type": "integer"})
        with pytest.raises(GrammarError, match=r"longer than 0\.2 s"):
            c.compile(spec)
        release.set()
        c.timeout = 10.0
        assert c.compile(spec) is c.compile(spec)  # finished in the background, then cached
    finally:
        release.set()
        c.shutdown()


def test_constrained_requests_do_not_speculate(compiler: GrammarCompiler) -> None:
    engine = tiny_engine(speculative="ngram")
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMAS[1]))
    prompt = [40, 41, 42, 40, 41, 42, 40, 41, 42]  # repetitive: the n-gram proposer would guess
    engine.add_request("c", prompt, SamplingParams(max_tokens=150, temperature=0.0), grammar=grammar)
    got = run_all(engine)
    jsonschema.validate(json.loads(text_of(got["c"])), SCHEMAS[1])
    assert engine.spec.num_draft_tokens == 0
    engine.add_request("free", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    run_all(engine)
    assert engine.spec.num_draft_tokens > 0  # the same prompt unconstrained does guess


def repeating_model() -> LlamaModel:
    """A tiny random model that prefers to repeat its last token: no layer writes to the residual
    stream and the head is the embedding, so each token's logit is its embedding's match with the last
    one. Under a grammar it takes the allowed token most like its last: a prompt ending in `{` leads
    it into a tool call, one ending in a letter into text."""
    w = tiny_weights()
    for name, t in w.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t.zero_()
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    return LlamaModel(TINY, w, torch.float32).eval()


def test_tool_choice_auto_gives_text_or_a_constrained_call(compiler: GrammarCompiler) -> None:
    short = {"type": "string", "maxLength": 3}
    weather = {
        "type": "function",
        "function": {
            "name": "w",
            "parameters": {"type": "object", "properties": {"c": short}, "required": ["c"], **CLOSED},
        },
    }
    p = tools.plan([weather], "auto", False)
    grammar = compiler.compile(GrammarSpec.lark(tools.auto_grammar(p)))
    engine = tiny_engine(repeating_model())
    engine.add_request(
        "call", list(b"Weather? {"), SamplingParams(max_tokens=80, temperature=0.0), grammar=grammar
    )
    engine.add_request(
        "text", list(b"Weather? a"), SamplingParams(max_tokens=8, temperature=0.0), grammar=grammar
    )
    got = {rid: text_of(tokens) for rid, tokens in run_all(engine).items()}
    calls = tools.parse_calls(got["call"], p)
    assert calls is not None and [c["function"]["name"] for c in calls] == ["w"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), weather["function"]["parameters"])
    assert got["text"].startswith("a") and tools.parse_calls(got["text"], p) is None
