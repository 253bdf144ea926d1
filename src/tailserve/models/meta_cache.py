"""A GGUF's config and tokenizer, cached in a fast form beside the model cache.

Reading them from the GGUF costs a start seconds: parsing the header (every tensor's entry, the
vocabulary arrays) and rebuilding the tokenizer from ~50k tokens and merges. Here both are kept in
a folder under `$TAILSERVE_HOME/meta/`: the `ModelConfig`'s fields and the tokenizer's settings in
meta.json, the tokenizer itself in `tokenizers`' own serialization (parsed in Rust).

The file's name is keyed by the model file (resolved path, size, mtime) and by the code that reads
it (loader.py, tokenizer.py): a changed model file or a changed reader gets a new entry, built from
the GGUF again. Hugging Face folders are read directly (their tokenizer.json is already this form).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from tailserve.models.loader import ModelConfig, cache_home, load_config
from tailserve.tokenizer import Tokenizer, gguf_tokenizer_parts

log = logging.getLogger("tailserve.loader")

FORMAT = 1  # bump when the entry's layout changes
_READERS = ("loader.py", "../tokenizer.py")  # the code whose output the entry holds


def entry_path(model_file: Path) -> Path:
    """The folder of this model file's entry, in this state, read by this code."""
    here = Path(__file__).resolve().parent
    st = model_file.stat()
    h = hashlib.sha256(f"{FORMAT}|{model_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for name in _READERS:
        h.update((here / name).read_bytes())
    return cache_home() / "meta" / f"{model_file.stem}-{h.hexdigest()[:16]}"


def _build(model_file: Path, folder: Path) -> None:
    """Read the GGUF and write its entry: meta.json (config, tokenizer settings) and tokenizer.json
    (`tokenizers`' serialization, which its Rust side parses without Python in the way). The folder
    appears whole or not at all, so a reader never meets half an entry."""
    config = load_config(model_file)
    backend, settings = gguf_tokenizer_parts(model_file)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        backend.save(str(tmp / "tokenizer.json"))
        meta = {"format": FORMAT, "config": dataclasses.asdict(config), "tokenizer": settings}
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.replace(folder)
    except OSError as e:  # a read-only or full disk: serve anyway, from the GGUF each time
        log.warning("could not cache the model's metadata in %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)


def _meta(model_file: Path) -> tuple[Path, dict[str, Any]]:
    """The entry's folder and its meta.json, built first if missing or unreadable."""
    folder = entry_path(model_file)
    for attempt in range(2):
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") == FORMAT and (folder / "tokenizer.json").is_file():
                return folder, meta
        except (OSError, ValueError) as e:
            if attempt or not isinstance(e, FileNotFoundError):
                log.warning("cached metadata in %s unreadable (%s): reading the GGUF", folder, e)
        if attempt == 0:
            shutil.rmtree(folder, ignore_errors=True)
            _build(model_file, folder)
    raise _Uncached


class _Uncached(Exception):
    """The entry could not be written or read back: the caller reads the GGUF."""


def cached_config(model_file: Path) -> ModelConfig:
    """The model's config: from the cache for a GGUF (built on a miss), else from config.json."""
    if model_file.suffix != ".gguf":
        return load_config(model_file)
    try:
        return ModelConfig(**_meta(model_file)[1]["config"])
    except _Uncached:
        return load_config(model_file)


def cached_tokenizer(model_file: Path) -> Tokenizer:
    """The model's tokenizer: from the cache for a GGUF (built on a miss), else tokenizer.json."""
    if model_file.suffix != ".gguf":
        return Tokenizer.load(model_file)
    try:
        folder, meta = _meta(model_file)
    except _Uncached:
        return Tokenizer.from_gguf(model_file)
    tokenizer = Tokenizer(Backend.from_file(str(folder / "tokenizer.json")), **meta["tokenizer"])
    tokenizer.token_bytes_file = folder / "token_bytes.bin"  # written by the first start that needs it
    return tokenizer
