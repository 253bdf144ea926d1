"""Text ↔ token ids, chat templates, and streaming detokenization with stop strings.

One `tokenizers.Tokenizer` serves both model sources: a GGUF file (built here from llama.cpp's
metadata, splitting text the way llama.cpp does for that vocabulary) or a Hugging Face folder
(`tokenizer.json`). BOS is added here rather than by the backend's post-processor, so both sources
follow one rule. `IncrementalDetokenizer` runs once per generated token on the engine's hot path.
"""

from __future__ import annotations

import functools
import json
import os
import re
from array import array
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta as jinja2_meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from tailserve.structured.tools import TemplateTools

# llama.cpp's token types (llama_token_type in GGUF metadata).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of special tokens that end a turn. Metadata names one EOS, but chat models end turns with a
# different token than their base model's EOS; llama.cpp keeps the same list for its EOG set.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "</s>",
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<EOT>",
        "<｜end▁of▁sentence｜>",
    }
)

# ChatML, for models that ship no template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (google/gemma-3 tokenizer_config.json, text only), for Gemma GGUFs that carry no
# template (llama.cpp falls back to the same format): a system message opens the first user turn,
# the assistant's role is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# How each `tokenizer.ggml.pre` splits text before BPE, as in llama.cpp's llama-vocab.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")

# Prompt tokens kept as decoding context: enough for a SentencePiece leading space or a split character.
_CONTEXT_TOKENS = 5


class Tokenizer:
    """A model's tokenizer: encode/decode, chat template, BOS rule and end-of-generation tokens."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        """Use `from_gguf`, `from_hf_dir` or `load`; this takes the pieces they read."""
        self._backend = backend
        extra_eos_token_ids = tuple(extra_eos_token_ids)
        self.vocab_size: int = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        for tid in (bos_token_id, eos_token_id, *extra_eos_token_ids):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"special token id {tid} is outside the vocabulary (size {self.vocab_size})")
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.eos_token_id = eos_token_id
        self._extra_eos_token_ids = extra_eos_token_ids
        self.eos_token_ids: set[int] = self._end_of_generation(eos_token_id, extra_eos_token_ids)
        self.bos_token = "" if bos_token_id is None else backend.id_to_token(bos_token_id) or ""
        self.eos_token = "" if eos_token_id is None else backend.id_to_token(eos_token_id) or ""
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)
        # id_to_piece decodes behind this anchor: decoders that strip a leading space do so only at the start.
        self._anchor = backend.encode("a", add_special_tokens=False).ids[:1]
        self._anchor_text = backend.decode(self._anchor, skip_special_tokens=False)
        # Where token_bytes keeps its result between starts (models/meta_cache.py sets it for a GGUF's
        # cached tokenizer; its folder is keyed by this file's source, so the definition cannot drift).
        self.token_bytes_file: Path | None = None

    def _end_of_generation(self, eos_token_id: int | None, extra: Iterable[int]) -> set[int]:
        """Metadata EOS plus every special token whose text ends a turn (llama.cpp's EOG set).

        Some conversions write EOS = BOS (e.g. `<|im_start|>`); then the metadata EOS is kept only if no
        turn-ending token was found, or generation would stop at the start of every turn.
        """
        ids = {
            tid
            for tid, tok in self._backend.get_added_tokens_decoder().items()
            if tok.special and tok.content in END_OF_GENERATION_TEXTS
        }
        ids.update(extra)
        if eos_token_id is not None and (eos_token_id != self.bos_token_id or not ids):
            ids.add(eos_token_id)
        return ids

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether both map every token text to the same id (a draft model's guesses are ids)."""

        def vocab(t: Tokenizer) -> dict[str, int]:
            return t._backend.get_vocab(with_added_tokens=True)

        return vocab(self) == vocab(other)

    # --- loading ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A `.gguf` file or a Hugging Face folder."""
        p = Path(path).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            return cls.from_gguf(p)
        if p.is_dir():
            return cls.from_hf_dir(p)
        raise ValueError(f"{path}: not a .gguf file or a folder with tokenizer.json")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer from llama.cpp's `tokenizer.ggml.*` metadata (gpt2 and llama models).
        models/meta_cache.py keeps the result in a fast form, so a start skips this vocabulary walk."""
        backend, settings = gguf_tokenizer_parts(Path(path))
        return cls(backend, **settings)

    def to_parts(self) -> tuple[Backend, dict[str, Any]]:
        """The backend and the settings `Tokenizer(backend, **settings)` rebuilds this tokenizer from."""
        return self._backend, {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "extra_eos_token_ids": list(self._extra_eos_token_ids),
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """`tokenizer.json`, plus `tokenizer_config.json` / `config.json` / `generation_config.json`."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(value: Any) -> int | None:
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if isinstance(text, str) else None

        bos = token_id(config.get("bos_token"))
        if bos is None:
            bos = model_config.get("bos_token_id")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the post-processor decides in transformers; ask it
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos is not None and probe[:1] == [bos]
        extra = _id_list(model_config.get("eos_token_id")) + _id_list(generation.get("eos_token_id"))
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=token_id(config.get("eos_token")),
            extra_eos_token_ids=extra,
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(folder, config),
        )

    # --- text ↔ ids ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids. BOS only if the model asks."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, not {type(text).__name__}")
        # encode_batch releases the GIL (plain encode does not), so a long prompt never stalls the
        # engine thread or the event loop.
        ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self._check_ids(ids)
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The text one token adds mid-sentence (leading space kept), for logprobs display."""
        self._check_ids((token_id,))
        if self._anchor:
            text = self._backend.decode([*self._anchor, token_id], skip_special_tokens=False)
            if text.startswith(self._anchor_text):
                return text[len(self._anchor_text) :]
        return self._backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """`_token_bytes`, from `token_bytes_file` when it holds them (~10 ms instead of ~0.1 s of GIL-bound
        work as the server turns ready), else computed and written there."""
        if self.token_bytes_file is None:
            return self._token_bytes()
        try:
            return _read_token_bytes(self.token_bytes_file, self.vocab_size)
        except (OSError, ValueError):
            tokens = self._token_bytes()
            _write_token_bytes(self.token_bytes_file, tokens)
            return tokens

    def _token_bytes(self) -> list[bytes]:
        """Each token's raw bytes as it appears mid-text (special tokens: b""), for grammar engines that
        match bytes against the vocabulary. Byte-level BPE maps GPT-2's printable alphabet back to bytes;
        SentencePiece writes spaces as ▁ and unknown bytes as <0xNN>. The grammar compiler builds this
        as the server becomes ready, holding the GIL: C-level string operations
        (translate, set inclusion) per token, not a Python loop over its characters."""
        special = {tid for tid, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        alphabet = {ord(ch): b for b, ch in _gpt2_byte_alphabet().items()}  # character → its byte
        printable = frozenset(_gpt2_byte_alphabet().values())
        byte_level = isinstance(self._backend.decoder, decoders.ByteLevel)
        out: list[bytes] = []
        for tid in range(self.vocab_size):
            piece = self._backend.id_to_token(tid)
            if piece is None or tid in special:
                out.append(b"")
            elif byte_level:
                in_alphabet = printable.issuperset(piece)
                out.append(piece.translate(alphabet).encode("latin-1") if in_alphabet else piece.encode())
            elif piece.startswith("<0x") and _BYTE_PIECE.fullmatch(piece):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("▁", " ").encode())
        return out

    @property
    def special_token_ids(self) -> list[int]:
        return sorted(tid for tid, tok in self._backend.get_added_tokens_decoder().items() if tok.special)

    def _check_ids(self, ids: Sequence[int]) -> None:
        # The backend silently drops unknown ids; a model whose logits outrun the vocabulary must not.
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    # --- chat ---------------------------------------------------------------------------------------

    @functools.cached_property
    def template_tools(self) -> TemplateTools:
        """What the chat template does with tools: native if it reads `tools` and writes
        `tool_calls`; a `tool` role if a tool message survives rendering (Gemma 3's raises)."""
        env = ImmutableSandboxedEnvironment()
        native = "tools" in jinja2_meta.find_undeclared_variables(env.parse(self.chat_template))
        probe = "tool-result-probe"
        conversation = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "tool", "content": probe},
        ]
        try:
            tool_role = probe in self.apply_chat_template(conversation)
        except ValueError:
            tool_role = False
        return TemplateTools(native=native and "tool_calls" in self.chat_template, tool_role=tool_role)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation, as transformers' `apply_chat_template(tokenize=False)`."""
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return self._template.render(
                messages=_normalize_messages(messages), add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:  # includes the template's own raise_exception(...)
            raise ValueError(f"chat template: {e}") from e


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into text deltas safe to stream.

    The concatenated deltas equal `decode(prompt + generated)` minus the prompt's text: each step
    decodes only a short window (prefix offset → end) and emits what the newest tokens added beyond
    the window's already-emitted part (vLLM's prefix/read offsets), so a token's leading space and
    a character split across byte tokens come out right. Text ending in U+FFFD (an incomplete
    character) waits for the next token. With stop strings, text that could begin one is held back
    until it can't; a stop string and everything after it are never emitted (unless
    `include_stop_str`, which emits the stop string itself).

    One known divergence: with SentencePiece byte fallback, `decode` turns a whole run of <0xNN>
    tokens into U+FFFD when any byte in it is invalid; the stream keeps the valid characters.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str: bool = False,
    ) -> None:
        stops = list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._decode = tokenizer._backend.decode
        self._skip = skip_special_tokens
        self._stops = stops
        self._include_stop = include_stop_str
        # The window: ids[0:read] were emitted (as prefix_text), ids[read:] are pending.
        self._ids = list(prompt_token_ids or [])[-_CONTEXT_TOKENS:]
        tokenizer._check_ids(self._ids)
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=skip_special_tokens)
        self._held = ""  # decoded, but possibly the start of a stop string
        self._chunks: list[str] = []
        self.stop_hit: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it releases (often "", never after a stop)."""
        if self.stop_hit is not None:
            return ""
        if not 0 <= token_id < self._tokenizer.vocab_size:
            self._tokenizer._check_ids((token_id,))
        self._ids.append(token_id)
        new_text = self._decode(self._ids, skip_special_tokens=self._skip)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(self._prefix_text) :]
        # Slide the window: the tokens just emitted become the next step's context.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids, skip_special_tokens=self._skip)
        return self._release(delta, final=False)

    def flush(self) -> str:
        """At finish: the held text. A character still incomplete can never complete, so it is
        dropped; a partial stop string did not turn into a stop, so it is real output (as in vLLM)."""
        if self.stop_hit is not None:
            return ""
        new_text = self._decode(self._ids, skip_special_tokens=self._skip)
        delta = new_text[len(self._prefix_text) :].rstrip("\ufffd")
        self._read, self._prefix_text = len(self._ids), new_text  # a second flush releases nothing
        return self._release(delta, final=True)

    def _release(self, delta: str, final: bool) -> str:
        if not self._stops:
            out = delta
        else:
            buf = self._held + delta
            out, self._held = self._cut_at_stop(buf, final)
        if out:
            self._chunks.append(out)
        return out

    def _cut_at_stop(self, buf: str, final: bool) -> tuple[str, str]:
        """(text to emit, text to hold). A stop can only start in `buf`: whatever could still begin one
        was held back. The first stop to complete wins; on a tie, the longer (earlier) one."""
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, self.stop_hit = best
            return buf[: end if self._include_stop else start], ""
        if final:
            return buf, ""
        keep = 0
        for s in self._stops:  # longest suffix of buf that some stop string starts with
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        return buf[: len(buf) - keep], buf[len(buf) - keep :]


# --- GGUF backends ------------------------------------------------------------------------------------


def gguf_tokenizer_parts(path: Path) -> tuple[Backend, dict[str, Any]]:
    """The backend and `Tokenizer` settings llama.cpp's `tokenizer.ggml.*` metadata describe."""
    from tailserve.models.loader import gguf_field, open_gguf

    reader = open_gguf(path)

    def field(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"tokenizer.ggml.{key}", default)

    kind, tokens = field("model"), field("tokens")
    if not kind or not tokens:
        raise ValueError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = field("token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    merges = _parse_merges(path, field("merges") or [])
    if kind == "gpt2":
        backend = _byte_level_bpe(path, tokens, merges, field("pre"))
    elif kind == "llama":
        scores = field("scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{path}: a llama (SentencePiece) tokenizer needs one score per token")
        backend = _sentencepiece_bpe(
            tokens, types, scores, merges, field("unknown_token_id"), field("add_space_prefix", True)
        )
    else:
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    # Matched whole in text: control tokens as special (skippable on decode), user-defined as plain.
    typed = list(zip(tokens, types, strict=True))
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == USER_DEFINED]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in (CONTROL, UNKNOWN)]
    )
    extra = [t for t in (field("eot_token_id"), field("eom_token_id")) if t is not None]
    return backend, {
        "bos_token_id": field("bos_token_id"),
        "eos_token_id": field("eos_token_id"),
        "extra_eos_token_ids": extra,
        # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise, never to gpt2 ones.
        "add_bos_token": bool(field("add_bos_token", kind == "llama")),
        "chat_template": gguf_field(reader, "tokenizer.chat_template") or _default_template(reader),
        "vocab_size": len(tokens),
    }


def _write_token_bytes(path: Path, tokens: list[bytes]) -> None:
    """The token count, each token's length (uint32), then the bytes; written whole or not at all (a
    read-only cache is left as it is: the next start computes them again)."""
    lengths = array("I", map(len, tokens))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(len(tokens).to_bytes(4, "little") + lengths.tobytes() + b"".join(tokens))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _read_token_bytes(path: Path, vocab_size: int) -> list[bytes]:
    """What `_write_token_bytes` wrote; ValueError if it is not that, for this vocabulary's size."""
    data = path.read_bytes()
    n = int.from_bytes(data[:4], "little")
    lengths = array("I")
    lengths.frombytes(data[4 : 4 + 4 * n])
    start = 4 + 4 * n
    if n != vocab_size or len(lengths) != n or start + sum(lengths) != len(data):
        raise ValueError(f"{path}: not this vocabulary's token bytes")
    out = []
    for length in lengths:
        out.append(data[start : start + length])
        start += length
    return out


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback token


@functools.cache
def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character map (byte-level BPE vocabularies are written in it)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _parse_merges(path: Path, merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    return pairs


def _byte_level_bpe(path: Path, tokens: list[str], merges: list[tuple[str, str]], pre: str | None) -> Backend:
    """GPT-2 style byte-level BPE, pre-split the way llama.cpp splits for this `tokenizer.ggml.pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pre = pre or "default"
    if pre in _GPT2_PRE:
        splitter = byte_level
    elif pre in _DIGITS_THEN_GPT2_PRE:  # each digit alone, then GPT-2's split (StarCoder's tokenizer.json)
        splitter = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_PRE:
        splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), no_regex])
    elif pre in _QWEN2_PRE:
        splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), no_regex])
    else:
        known = ", ".join(_GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE)
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {known})")
    vocab = {t: i for i, t in enumerate(tokens)}
    # llama.cpp looks whole words up in the vocabulary before merging for Llama 3 (ignore_merges).
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str],
    types: list[int],
    scores: list[float],
    merges: list[tuple[str, str]],
    unk_id: int | None,
    add_space_prefix: bool,
) -> Backend:
    """SentencePiece BPE as llama.cpp runs it: spaces as ▁, a ▁ before every text run (also after
    special tokens), best-scoring merges first, unknown characters as <0xNN> byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if not merges:  # SentencePiece merges the pair whose result scores best: rank merges by that score
        ranked = sorted(
            (-scores[i], i, k, tok[:k], tok[k:])
            for i, (tok, ty) in enumerate(zip(tokens, types, strict=True))
            if ty == NORMAL
            for k in range(1, len(tok))
            if tok[:k] in vocab and tok[k:] in vocab
        )
        merges = [(left, right) for *_, left, right in ranked]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _default_template(reader: Any) -> str | None:
    """The template of a GGUF without one: Gemma's turn format for Gemma, else None (ChatML)."""
    from tailserve.models.loader import gguf_field

    return GEMMA_TEMPLATE if str(gguf_field(reader, "general.architecture", "")).startswith("gemma") else None


# --- Hugging Face folder --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _hf_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's template (a string or named templates), else chat_template.jinja/.json."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template:
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


# --- chat templates -------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ', which would corrupt tool schemas in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in, so templates written for it work here."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse: {e}") from e


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape, and flatten content parts to the string that text-only templates expect."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            raise ValueError(f"messages[{i}] must be an object with a string 'role' and a 'content'")
        out.append({**message, "content": _content_text(message["content"], f"messages[{i}].content")})
    return out


def _content_text(content: Any, where: str) -> str:
    """A string, None (an assistant turn that only calls tools), or text parts joined by newlines (vLLM)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of text parts")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError(f"{where}[{j}]: only {{'type': 'text', 'text': ...}} parts are supported")
    return "\n".join(part["text"] for part in content)
