"""Tokenizer: GGUF/HF loading against transformers, chat templates, streaming detokenization, stop strings.

Tiny GGUF tokenizers written here run without the model; tests marked `model` use the default model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, pre_tokenizers

from tailserve.tokenizer import CHATML_TEMPLATE, IncrementalDetokenizer, Tokenizer, _gpt2_byte_alphabet

# --- tiny tokenizers --------------------------------------------------------------------------------


def byte_chars(text: str) -> str:
    """How byte-level BPE spells `text` (one printable character per UTF-8 byte)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def write_gguf(path: Path, *, model: str, tokens: list[str], types: list[int], **kv: Any) -> Path:
    """A GGUF with tokenizer metadata only; kv maps GGUFWriter's `add_<name>` methods to values."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for name, value in kv.items():
        getattr(w, f"add_{name}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges over "ab \n", "hello world" and the first two bytes of 👍, so tokens span characters and spaces.
TINY_MERGES = [
    "a b",
    "b a",
    "Ġ a",
    "Ġ b",
    "Ġa b",
    "Ċ Ċ",
    "Ġ Ġ",
    "ab ab",
    "h e",
    "l l",
    "ll o",
    "he llo",
    "Ġ w",
    "o r",
    "Ġw or",
    "l d",
    "Ġwor ld",
    " ".join(byte_chars("👍")[:2]),
]


def tiny_bpe_path(path: Path, **kv: Any) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in TINY_MERGES]
    tokens = [*SPECIALS, *alphabet, *merged, "<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(alphabet) + len(merged)) + [4]
    kv = {"tokenizer_pre": "gpt-2", "bos_token_id": 1, "eos_token_id": 1, **kv}
    return write_gguf(path, model="gpt2", tokens=tokens, types=types, token_merges=TINY_MERGES, **kv)


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_bpe_path(tmp_path_factory.mktemp("bpe") / "tiny.gguf"))


SPM_PIECES = {  # piece: score; SentencePiece merges the pair whose result scores best
    "▁": -100.0,
    "h": -100.0,
    "e": -100.0,
    "l": -100.0,
    "o": -100.0,
    "w": -100.0,
    "r": -100.0,
    "d": -100.0,
    "he": -1.0,
    "ll": -2.0,
    "llo": -3.0,
    "hello": -4.0,
    "▁hello": -5.0,
    "or": -6.0,
    "ld": -6.5,
    "wor": -7.0,
    "world": -8.0,
    "▁world": -9.0,
}


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, *SPM_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (3 + 256) + list(SPM_PIECES.values())
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_gguf(
        path,
        model="llama",
        tokens=tokens,
        types=types,
        token_scores=scores,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
    )
    return Tokenizer.from_gguf(path)


# --- the default model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> Path:
    from tailserve.models.loader import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol(model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(model_path)


@pytest.fixture(scope="module")
def hf(model_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x:\n\t\treturn [x, {'a': 1}]  # done\n    return None\n",
    "12345 3.14 -0.5e10 $100, 1st of 2,000",
    "a   b\n\n\n   c \t\t d    \n\n",
    "   leading and trailing   ",
    "日本語のテキスト，中文也可以。한국어",
    "Crème brûlée, naïve façade, Ångström, ß",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and ☃",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<jupyter_code>x = 1",
    "<|im_start|> spaced <|im_end|>",
    "",
]


@pytest.mark.model
def test_gguf_encode_decode_match_transformers(smol: Tokenizer, hf: Any) -> None:
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == hf.encode(text), text
        assert smol.decode(ids, False) == hf.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


@pytest.mark.model
def test_digits_split_like_smollm2s_own_tokenizer(smol: Tokenizer) -> None:
    # SmolLM2's tokenizer.json splits every digit off (Digits(individual_digits=True)) before GPT-2's
    # byte-level split, and so does llama.cpp for pre "smollm". transformers' GGUF converter uses the
    # GPT-2 split alone, which breaks a whitespace run in front of a digit in two: "x  1" becomes
    # x|Ġ|Ġ|1 there; the model was trained on x|ĠĠ|1.
    assert smol.encode("x  1") == [104, 256, 33]  # x, ĠĠ, 1
    assert smol.encode("a\n\n2") == [81, 1116, 34]  # a, ĊĊ, 2
    assert smol.encode("12345") == [33, 34, 35, 36, 37]


@pytest.mark.model
def test_metadata_and_end_of_generation(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.bos_token_id == 1 and not smol.add_bos_token
    assert 2 in smol.eos_token_ids  # <|im_end|> ends a chat turn
    assert 0 in smol.eos_token_ids  # <|endoftext|>, as in llama.cpp's EOG set
    assert 1 not in smol.eos_token_ids  # <|im_start|> (the BOS) starts turns
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)
    assert [smol.id_to_piece(i) for i in smol.encode(" Hello<|im_end|>")] == [" Hello", "<|im_end|>"]


def test_eos_equal_to_bos_is_dropped_when_a_turn_end_exists(tiny_bpe: Tokenizer, tmp_path: Path) -> None:
    # The tiny file says eos = bos = <|im_start|>, a known conversion quirk.
    assert tiny_bpe.eos_token_ids == {0, 2}
    path = write_gguf(
        tmp_path / "t.gguf", model="gpt2", tokens=["<s>", "a"], types=[3, 1], bos_token_id=0, eos_token_id=0
    )
    alone = Tokenizer.from_gguf(path)
    assert alone.eos_token_ids == {0}  # nothing else ends a turn: keep what the metadata says


@pytest.mark.model
def test_chat_template_matches_transformers(smol: Tokenizer, hf: Any) -> None:
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Hi 👋"}],
        [{"role": r, "content": c} for r, c in [("user", "a"), ("assistant", "b"), ("user", "c")]],
    ]
    for messages in conversations:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smol.apply_chat_template(messages, add_generation_prompt=gen) == expected


@pytest.mark.model
def test_hf_folder_loads_like_transformers(hf: Any, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert 2 in tok.eos_token_ids and tok.bos_token_id == 1 and not tok.add_bos_token


def test_hf_folder_reads_bos_rule_and_eos_lists(tiny_bpe: Tokenizer, tmp_path: Path) -> None:
    tiny_bpe._backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>"},
                "eos_token": "<|endoftext|>",
                "add_bos_token": True,
                "chat_template": [
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}
                ],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("ab") == [1, *tiny_bpe.encode("ab")]
    assert tok.encode("<|im_start|>ab") == tok.encode("ab")  # never a second BOS
    assert tok.eos_token_ids == {0, 2}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


# --- tiny byte-level BPE and SentencePiece --------------------------------------------------------


def test_tiny_bpe_matches_special_and_user_defined_tokens_whole(tiny_bpe: Tokenizer) -> None:
    ids = tiny_bpe.encode("<|im_start|>hello<think> world<|im_end|>")
    pieces = [tiny_bpe.id_to_piece(i) for i in ids]
    assert pieces == ["<|im_start|>", "hello", "<think>", " world", "<|im_end|>"]
    # Control tokens are skipped on request; a user-defined token is text.
    assert tiny_bpe.decode(ids) == "hello<think> world"
    assert tiny_bpe.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<think> world<|im_end|>"


def test_sentencepiece_follows_llama_cpp(tiny_spm: Tokenizer) -> None:
    ids = {piece: tiny_spm._backend.token_to_id(piece) for piece in SPM_PIECES}
    assert tiny_spm.add_bos_token  # llama.cpp's default for SentencePiece vocabularies
    assert tiny_spm.encode("hello world") == [1, ids["▁hello"], ids["▁world"]]
    assert tiny_spm.decode(tiny_spm.encode("hello world")) == "hello world"
    # Characters outside the vocabulary fall back to bytes: "i" is <0x69>, 👍 is four byte tokens.
    assert tiny_spm.encode("hi", add_special_tokens=False) == [ids["▁"], ids["h"], 3 + 0x69]
    assert tiny_spm.decode(tiny_spm.encode("hi 👍")) == "hi 👍"
    # A ▁ before every text run, also right after a special token; leading spaces are all kept.
    assert tiny_spm.encode("</s>hello", add_special_tokens=False) == [2, ids["▁hello"]]
    assert tiny_spm.encode("  hello", add_special_tokens=False) == [ids["▁"], ids["▁"], ids["▁hello"]]
    assert tiny_spm.decode(tiny_spm.encode("  hello")) == "  hello"
    assert tiny_spm.id_to_piece(ids["▁world"]) == " world"
    assert tiny_spm.eos_token_ids == {2}


def test_chatml_fallback_and_template_environment(tiny_bpe: Tokenizer, tmp_path: Path) -> None:
    assert tiny_bpe.chat_template == CHATML_TEMPLATE
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert tiny_bpe.apply_chat_template([{"role": "user", "content": parts}]) == (
        "<|im_start|>user\none\ntwo<|im_end|>\n<|im_start|>assistant\n"
    )
    template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{{ m['content'] | tojson }}{% endfor %}{{ tools | tojson }}|{{ strftime_now('%Y') | length }}"
    )
    tok = Tokenizer.from_gguf(tiny_bpe_path(tmp_path / "t.gguf", chat_template=template))
    out = tok.apply_chat_template([{"role": "user", "content": "<b>&é"}], tools=[{"name": "f"}])
    assert out == '"<b>&é"[{"name": "f"}]|4'  # tojson as transformers: no HTML escaping, no \\u escapes
    with pytest.raises(ValueError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


# --- incremental detokenization -------------------------------------------------------------------


def stream(tok: Tokenizer, ids: Sequence[int], prompt: Sequence[int] = (), **kw: Any) -> list[str]:
    """Deltas for ids one at a time, then the flush; checks `text` keeps up."""
    d = IncrementalDetokenizer(tok, list(prompt), **kw)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        assert d.text == "".join(deltas)
    deltas.append(d.flush())
    assert d.text == "".join(deltas)
    return deltas


def check_stream(tok: Tokenizer, ids: Sequence[int], prompt: Sequence[int] = (), skip: bool = True) -> None:
    full = tok.decode([*prompt, *ids], skip)
    head = tok.decode(list(prompt), skip)
    assert full.startswith(head)
    expected = full[len(head) :].rstrip("\ufffd")  # an unfinished character at the end is dropped
    deltas = stream(tok, ids, prompt, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in x for x in deltas)


def id_lists(vocab: int, favoured: list[int]) -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(favoured)), max_size=24)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_deltas_equal_decode_for_random_ids_tiny(tiny_bpe: Tokenizer, data: st.DataObject) -> None:
    # Mostly single-byte tokens: characters split across tokens everywhere, invalid bytes too.
    ids = data.draw(id_lists(tiny_bpe.vocab_size, [0, 1, 2]))
    prompt = data.draw(st.sampled_from([[], tiny_bpe.encode("<|im_start|>hello"), tiny_bpe.encode("é👍")]))
    check_stream(tiny_bpe, ids, prompt, skip=data.draw(st.booleans()))


@pytest.mark.model
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_deltas_equal_decode_for_random_ids_smollm(smol: Tokenizer, data: st.DataObject) -> None:
    byte_ids = list(range(17, 273))  # the single-byte tokens, including UTF-8 lead and continuation bytes
    ids = data.draw(id_lists(smol.vocab_size, [0, 1, 2, *byte_ids]))
    check_stream(smol, ids, skip=data.draw(st.booleans()))


@pytest.mark.model
@settings(max_examples=100, deadline=None)
# SmolLM2's vocabulary lacks a few bytes (F1, F2 and some control characters): text using them cannot
# be encoded, by the model's own tokenizer either.
@given(
    text=st.text(
        st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d"),
        max_size=30,
    ),
    prompt=st.sampled_from(["", "Hi", "é"]),
)
def test_deltas_equal_the_text_for_encoded_text(smol: Tokenizer, text: str, prompt: str) -> None:
    deltas = stream(smol, smol.encode(text), smol.encode(prompt))
    assert "".join(deltas) == text.rstrip("\ufffd")  # a final U+FFFD looks like an unfinished character
    assert not any("\ufffd" in x for x in deltas) or "\ufffd" in text


@pytest.mark.model
def test_multibyte_characters_wait_until_complete(smol: Tokenizer) -> None:
    text = "a 👍🏽 中文 b"
    ids = smol.encode(text)
    deltas = stream(smol, ids)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # some token held back a partial character
    assert all("\ufffd" not in x for x in deltas)
    unfinished = stream(smol, smol.encode("x 👍")[:-1])  # the emoji's last byte never comes
    assert "".join(unfinished) == "x " and all("\ufffd" not in x for x in unfinished)


def test_sentencepiece_leading_space_uses_the_prompt(tiny_spm: Tokenizer) -> None:
    world = tiny_spm._backend.token_to_id("▁world")
    assert "".join(stream(tiny_spm, [world], tiny_spm.encode("hello"))) == " world"
    assert "".join(stream(tiny_spm, [world])) == "world"  # first token of the text: no space, like decode
    check_stream(tiny_spm, tiny_spm.encode("hello world 👍 hi", add_special_tokens=False))


SPM_NON_BYTE_IDS = [0, 1, 2, *range(259, 259 + len(SPM_PIECES))]  # ids 3..258 are the byte tokens <0xNN>


@settings(max_examples=200, deadline=None)
@given(
    units=st.lists(st.sampled_from(SPM_NON_BYTE_IDS) | st.characters(min_codepoint=0x80), max_size=12),
    prompt=st.sampled_from(["", "hello", "é"]),
    skip=st.booleans(),
)
def test_deltas_equal_decode_sentencepiece(
    tiny_spm: Tokenizer, units: list[int | str], prompt: str, skip: bool
) -> None:
    # Characters as runs of byte tokens, between pieces and special tokens. Only valid runs: HF's
    # ByteFallback decoder blanks a whole run that has an invalid byte (see IncrementalDetokenizer).
    ids = [i for u in units for i in ([3 + b for b in u.encode()] if isinstance(u, str) else [u])]
    check_stream(tiny_spm, ids, tiny_spm.encode(prompt), skip)


def test_add_rejects_ids_outside_the_vocabulary(tiny_bpe: Tokenizer) -> None:
    d = IncrementalDetokenizer(tiny_bpe)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        d.add(tiny_bpe.vocab_size)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        d.add(-1)


# --- stop strings ---------------------------------------------------------------------------------


def run_stop(
    tok: Tokenizer, text: str, stop: list[str], **kw: Any
) -> tuple[list[str], IncrementalDetokenizer]:
    """Deltas for the tokens of `text` then the flush, and the detokenizer."""
    d = IncrementalDetokenizer(tok, stop=stop, **kw)
    deltas = [d.add(i) for i in tok.encode(text)]
    deltas.append(d.flush())
    return deltas, d


@pytest.mark.model
def test_stop_string_spanning_tokens_is_never_emitted(smol: Tokenizer) -> None:
    text = "The answer is 42.\nUser: next question"
    assert len(smol.encode("\nUser:")) == 3  # the stop string spans three tokens
    for include in (False, True):
        deltas, d = run_stop(smol, text, ["\nUser:"], include_stop_str=include)
        assert d.stop_hit == "\nUser:"
        assert "".join(deltas) == ("The answer is 42.\nUser:" if include else "The answer is 42.")
        assert "next" not in d.text


def test_partial_stop_is_held_then_released(tiny_bpe: Tokenizer) -> None:
    d = IncrementalDetokenizer(tiny_bpe, stop=["hello world!"])
    emitted = [d.add(i) for i in tiny_bpe.encode("ab hello")]
    assert d.text == "ab "  # "hello" may begin the stop string
    emitted.append(d.add(tiny_bpe.encode(" world")[0]))
    assert d.text == "ab "
    emitted.append(d.add(tiny_bpe.encode("?")[0]))  # not the stop string after all
    assert d.text == "ab hello world?" == "".join(emitted) and d.stop_hit is None
    for i in tiny_bpe.encode(" hello"):
        d.add(i)
    assert d.text == "ab hello world? "
    assert d.flush() == "hello"  # generation ended: a partial match is output, as in vLLM
    assert d.flush() == ""


def test_stop_inside_one_token_and_after_stop(tiny_bpe: Tokenizer) -> None:
    deltas, d = run_stop(tiny_bpe, "abab hello world", ["ba"])
    assert "".join(deltas) == "a" and d.stop_hit == "ba"
    assert d.add(tiny_bpe.encode("a")[0]) == "" and d.flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.sampled_from("ab \n"), max_size=24),
    stop=st.lists(st.text(st.sampled_from("ab \n"), min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_strings_cut_the_text_at_the_first_completed_match(
    tiny_bpe: Tokenizer, text: str, stop: list[str], include: bool
) -> None:
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if matches:
        end, start, first = min(matches)
        expected, hit = text[: end if include else start], first
    else:
        expected, hit = text, None
    d = IncrementalDetokenizer(tiny_bpe, stop=stop, include_stop_str=include)
    for i in tiny_bpe.encode(text):
        d.add(i)
        assert expected.startswith(d.text)  # nothing past the stop, ever
    d.flush()
    assert d.text == expected and d.stop_hit == hit


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{broken")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: Tokenizer.load(tmp_path / "missing.gguf"), "not a .gguf file or a folder"),
        (lambda: Tokenizer.from_gguf(junk), "not a readable GGUF"),
        (lambda: Tokenizer.from_hf_dir(empty), "no tokenizer.json"),
        (
            lambda: Tokenizer.from_gguf(
                write_gguf(tmp_path / "b.gguf", model="bert", tokens=["a"], types=[1])
            ),
            "tokenizer model 'bert' is not supported",
        ),
        (
            lambda: Tokenizer.from_gguf(tiny_bpe_path(tmp_path / "p.gguf", tokenizer_pre="klingon")),
            "pre-tokenizer 'klingon' is not supported",
        ),
        (
            lambda: Tokenizer.from_gguf(tiny_bpe_path(tmp_path / "e.gguf", eos_token_id=10**6)),
            "outside the vocabulary",
        ),
        (
            lambda: Tokenizer.from_gguf(
                write_gguf(tmp_path / "m.gguf", model="gpt2", tokens=["a"], types=[1], token_merges=["a"])
            ),
            "malformed merge",
        ),
        (
            lambda: Tokenizer.from_gguf(
                write_gguf(tmp_path / "s.gguf", model="llama", tokens=["a"], types=[1])
            ),
            "one score per token",
        ),
        (
            lambda: Tokenizer.from_gguf(tiny_bpe_path(tmp_path / "t.gguf", chat_template="{% for %}")),
            "chat template does not parse",
        ),
        (lambda: Tokenizer.from_hf_dir(broken), "not a valid tokenizer.json"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", "non-empty list"),
        ([], "non-empty list"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\] must be an object"),
        ([{"role": "user"}], r"messages\[0\] must be an object"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\]: only"),
    ],
)
def test_bad_messages_raise(tiny_bpe: Tokenizer, messages: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_bpe.apply_chat_template(messages)


def test_bad_calls_raise(tiny_bpe: Tokenizer) -> None:
    with pytest.raises(ValueError, match="must be a str"):
        tiny_bpe.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_bpe.decode([0, tiny_bpe.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_bpe.id_to_piece(-1)
    with pytest.raises(ValueError, match="non-empty strings"):
        IncrementalDetokenizer(tiny_bpe, stop=[""])


@pytest.mark.model
def test_same_vocabulary_is_what_a_draft_model_needs(
    smol: Tokenizer, tiny_bpe: Tokenizer, model_path: Path
) -> None:
    assert smol.same_vocabulary(Tokenizer.load(model_path))
    assert not smol.same_vocabulary(tiny_bpe)


def reference_token_bytes(tok: Tokenizer) -> list[bytes]:
    """token_bytes by its definition, one character at a time (what the fast version must equal)."""
    alphabet = {ch: b for b, ch in _gpt2_byte_alphabet().items()}
    special = set(tok.special_token_ids)
    byte_level = isinstance(tok._backend.decoder, decoders.ByteLevel)
    out = []
    for tid in range(tok.vocab_size):
        piece = tok._backend.id_to_token(tid)
        if piece is None or tid in special:
            out.append(b"")
        elif byte_level:
            known = all(c in alphabet for c in piece)
            out.append(bytes(alphabet[c] for c in piece) if known else piece.encode())
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def test_token_bytes_follow_the_definition(tiny_bpe: Tokenizer, tiny_spm: Tokenizer) -> None:
    for tok in (tiny_bpe, tiny_spm):
        assert tok.token_bytes() == reference_token_bytes(tok)


@pytest.mark.model
def test_token_bytes_of_the_default_model_follow_the_definition(smol: Tokenizer) -> None:
    assert smol.token_bytes() == reference_token_bytes(smol)


def test_token_bytes_are_kept_in_their_file_and_a_bad_file_is_rewritten(
    tiny_bpe: Tokenizer, tmp_path: Path
) -> None:
    expected = reference_token_bytes(tiny_bpe)
    tiny_bpe.token_bytes_file = tmp_path / "token_bytes.bin"
    try:
        assert tiny_bpe.token_bytes() == expected  # computed, then written
        written = tiny_bpe.token_bytes_file.read_bytes()
        assert tiny_bpe.token_bytes() == expected  # read back
        tiny_bpe.token_bytes_file.write_bytes(written[:-1])  # truncated: not these tokens
        assert tiny_bpe.token_bytes() == expected
        assert tiny_bpe.token_bytes_file.read_bytes() == written
    finally:
        tiny_bpe.token_bytes_file = None
