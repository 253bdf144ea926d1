"""The GGUF's config and tokenizer cached in a fast form (models/meta_cache.py): the same tokens as the
tokenizer rebuilt from the GGUF, and a new entry when the model file changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tailserve.models import meta_cache
from tailserve.models.loader import load_config
from tailserve.tokenizer import Tokenizer
from tests.unit.test_tokenizer import SPECIALS, tiny_bpe_path

# Plain prose, code, digits, whitespace runs, accents, CJK, emoji, special and unknown-looking tokens.
TEXTS = (
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "  leading spaces,\ttabs\n\nand blank lines\r\n",
    "def f(x):\n    return x ** 2  # squares\n",
    "naïve café — ümlaut, façade; 日本語のテキスト, 한국어, русский",
    "emoji 🤖👍🏽 and symbols ∑∫√ ≠ ≤",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token<|im_end|>",
    "<not a special token> <|im_start",
    "",
)

# A llama-architecture header beside the tiny tokenizer, so the GGUF has a config to cache too.
TINY_ARCH = {
    "context_length": 64,
    "embedding_length": 8,
    "block_count": 1,
    "head_count": 2,
    "feed_forward_length": 16,
    "layer_norm_rms_eps": 1e-5,
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TAILSERVE_HOME", str(home))
    return home


def assert_same(cached: Tokenizer, built: Tokenizer) -> None:
    for text in TEXTS:
        assert cached.encode(text) == built.encode(text), text
        ids = built.encode(text)
        assert cached.decode(ids) == built.decode(ids)
    assert cached.eos_token_ids == built.eos_token_ids
    assert (cached.bos_token, cached.eos_token) == (built.bos_token, built.eos_token)
    assert cached.to_parts()[1] == built.to_parts()[1]
    assert cached.same_vocabulary(built)


@pytest.mark.model
def test_cached_default_model_tokenizes_as_the_gguf(own_cache: Path) -> None:
    from tailserve.models.loader import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    cached = meta_cache.cached_tokenizer(path)  # builds the entry, then reads it back
    assert (meta_cache.entry_path(path) / "tokenizer.json").is_file()
    gguf = Tokenizer.from_gguf(path)
    assert_same(cached, gguf)
    assert meta_cache.cached_config(path) == load_config(path)
    assert cached.token_bytes() == gguf.token_bytes()  # computed, then kept
    assert cached.token_bytes_file == meta_cache.entry_path(path) / "token_bytes.bin"
    assert meta_cache.cached_tokenizer(path).token_bytes() == cached.token_bytes()  # read back


def test_a_changed_model_file_gets_a_new_entry(tmp_path: Path) -> None:
    path = tiny_bpe_path(tmp_path / "m.gguf", **TINY_ARCH)
    before = meta_cache.cached_tokenizer(path)
    old_entry = meta_cache.entry_path(path)
    assert before.bos_token == SPECIALS[1]
    # The same path, another file: BOS is now <|endoftext|> and the context twice as long.
    tiny_bpe_path(path, **(TINY_ARCH | {"context_length": 128}), bos_token_id=0, eos_token_id=0)
    assert meta_cache.entry_path(path) != old_entry
    after = meta_cache.cached_tokenizer(path)
    assert after.bos_token == SPECIALS[0]
    assert_same(after, Tokenizer.from_gguf(path))
    assert meta_cache.cached_config(path).max_position_embeddings == 128
    assert meta_cache.entry_path(path).is_dir() and old_entry.is_dir()


def test_a_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    path = tiny_bpe_path(tmp_path / "m.gguf", **TINY_ARCH)
    config = meta_cache.cached_config(path)
    assert dataclasses.asdict(config) == dataclasses.asdict(load_config(path))
    (meta_cache.entry_path(path) / "meta.json").write_text("{not json")
    assert_same(meta_cache.cached_tokenizer(path), Tokenizer.from_gguf(path))
    assert meta_cache.cached_config(path) == config


def test_an_unwritable_cache_falls_back_to_the_gguf(tmp_path: Path, own_cache: Path) -> None:
    path = tiny_bpe_path(tmp_path / "m.gguf", **TINY_ARCH)
    own_cache.mkdir()
    (own_cache / "meta").write_text("a file where the folder should be")
    assert_same(meta_cache.cached_tokenizer(path), Tokenizer.from_gguf(path))
    assert meta_cache.cached_config(path) == load_config(path)
