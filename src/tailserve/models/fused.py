"""Every family's decoder as one C++ call per step (csrc/llama.h), on every CPU tier (layers/kernels.py).

Llama's step, plus the other families' options (models/llama.py's table) passed to it as flags and
per-layer tensors: Q/K/V bias, per-head Q/K norms, (1 + w) norms (the 1 folded into the fp32 weights
here), the embedding scale, Gemma's output norms, GELU-tanh gate, query scale, sliding windows with
their own RoPE tables, and final-logit soft-capping. A plain Llama model sets none of them, so its
step is Llama's as it was. The same math as models/llama.py, which stays the reference and the path
everywhere else (GPU, fp32, no compiler). Eager PyTorch spends most of a small model's decode step
dispatching ~600 tiny ops; here the step is one call that releases the GIL. Each row's numbers
depend only on its own sequence (no reduction spans rows), so a sequence gets bitwise the same logits
alone, batched, chunked, or verified several tokens at a time.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from tailserve.layers import kernels
from tailserve.layers.linear import (
    VNNI_INT4,
    VNNI_INT8,
    DenseLinear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    Linear,
    make_linear,
)
from tailserve.models.llama import _layer_weights, rope_tables
from tailserve.models.loader import ModelConfig, cache_home

SWIGLU_HALF = 16  # gate/up rows per half-block of the packed layout (csrc/linear.h: SwiGlu)
BLOCK_MULTIPLE = 16  # the KV block size must be a multiple of this (csrc/attention.h: pair layout)
GATE_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the gate's activation as Llama::set_family takes it
NONE = torch.empty(0)  # an option a layer does not have (Llama::set_layer_options)


def fused_supported(config: ModelConfig, tier: str | None = None) -> bool:
    """Whether this machine (at `tier`, default the chosen one) and this model's shape run the fused
    step (every family of models/llama.py does)."""
    return (
        kernels.ops(tier) is not None
        and config.activation in GATE_ACTIVATIONS
        and config.intermediate_size % SWIGLU_HALF == 0
        and config.head_dim in (16, 32, 64, 128, 256)
        and config.num_heads % config.num_kv_heads == 0
        and config.num_heads // config.num_kv_heads <= 8
        and config.hidden_size % 2 == 0
    )


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, K] gate and up → [2I, K] in blocks of 32 rows: 16 gate rows, then the same 16 up rows."""
    i, k = gate.shape
    h = SWIGLU_HALF
    return torch.stack([gate.reshape(i // h, h, k), up.reshape(i // h, h, k)], 1).reshape(2 * i, k)


def _packed(layer: Linear, ops: ModuleType):
    """The C++ view of a kernel-backed linear's packed buffers (kinds: csrc/linear.h)."""
    assert layer.backend in ("kernel", "vnni"), "the fused step needs the C++ linears"
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, DenseLinear):
        return ops.Linear(0, layer.packed, torch.empty(0), n, k, 0)
    if isinstance(layer, Int8Linear):
        return ops.Linear(1, layer.packed, layer.scale, n, k, 0)
    if isinstance(layer, Int8GroupLinear):
        return ops.Linear(VNNI_INT8, layer.packed, layer.scales, n, k, layer.group)
    assert isinstance(layer, Int4Linear)
    kind = VNNI_INT4 if layer.backend == "vnni" else 2
    return ops.Linear(kind, layer.packed, layer.scales, n, k, layer.group)


def norm_weight(config: ModelConfig, w: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's weight as the C++ step multiplies by it: fp32, with Gemma's 1 + w folded in."""
    return (w.float() + 1.0 if config.norm_plus_one else w.float()).contiguous()


class FusedLayer(nn.Module):
    """One decoder layer's weights, packed; holds the buffers the C++ model reads."""

    def __init__(
        self, config: ModelConfig, w: dict[str, torch.Tensor], quantization: str, sliding: bool
    ) -> None:
        super().__init__()
        c = config
        bf16 = torch.bfloat16
        self.sliding = sliding
        self.register_buffer("input_norm", norm_weight(c, w["input_layernorm"]))
        # The norm before the MLP: Gemma 3's pre_feedforward_layernorm; Llama's post_attention_layernorm.
        pre_mlp = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
        self.register_buffer("post_norm", norm_weight(c, w[pre_mlp]))
        proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        options = {
            "qkv_bias": torch.cat([w[p + ".bias"] for p in proj]).float() if c.attention_bias else None,
            "q_norm": norm_weight(c, w["self_attn.q_norm"]) if c.qk_norm else None,
            "k_norm": norm_weight(c, w["self_attn.k_norm"]) if c.qk_norm else None,
            "attn_out_norm": norm_weight(c, w["post_attention_layernorm"]) if c.sandwich_norms else None,
            "mlp_out_norm": norm_weight(c, w["post_feedforward_layernorm"]) if c.sandwich_norms else None,
        }
        self.option_names = [k for k, v in options.items() if v is not None]
        for name in self.option_names:
            self.register_buffer(name, options[name].contiguous())
        qkv = torch.cat([w[p] for p in proj])
        self.qkv = make_linear(qkv, quantization, bf16, vnni=True)
        self.o = make_linear(w["self_attn.o_proj"], quantization, bf16, vnni=True)
        gate_up = interleave_gate_up(w["mlp.gate_proj"], w["mlp.up_proj"])
        self.gate_up = make_linear(gate_up, quantization, bf16, vnni=True)
        self.down = make_linear(w["mlp.down_proj"], quantization, bf16, vnni=True)

    def has_options(self) -> bool:
        return self.sliding or bool(self.option_names)

    def options(self) -> list:
        """Llama::set_layer_options' arguments after the layer's index."""
        names = ("qkv_bias", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")
        return [getattr(self, n) if n in self.option_names else NONE for n in names] + [self.sliding]


def default_threads() -> int:
    """The step's thread team when none is set: $OMP_NUM_THREADS if set, else the cores this process
    may run on. Not torch's intra-op count: loading a fused model sets that to 1 (engine/load.py), which
    would leave every later model in the process on one thread."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


class FusedLlama(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        quantization: str = "none",
        draft_head: bool = False,
        num_threads: int | None = None,
        tier: str | None = None,
    ) -> None:
        """Linears are built (and quantized) from the source weights. Activations run in bf16; int8 and
        int4 layers take them quantized to int8 per group of 32 (vpdpbusd, as llama.cpp does with the
        same GGUF weights): ~1.3× faster than bf16 activations from 4 rows up, at a KL of ~0.003
        against fp32 instead of ~0.001 (BENCHMARKS.md).

        draft_head: also an int4 copy of the head for draft passes (`depth` < layers). The head is ~30 %
        of the bytes an int4 step reads, so a shallow draft is cheap only with a cheap head; its error
        can cost acceptance, never exactness (the full pass verifies every draft).
        num_threads: threads that run a step (default: torch's intra-op count, i.e. the cores).
        tier: the CPU tier's kernels to run (default: the chosen one; tests run each). The packed
        weights are the same on every tier."""
        super().__init__()
        if not fused_supported(config, tier):
            raise RuntimeError("the fused step needs the C++ kernels (a compiler) and a supported shape")
        self.config = config
        self.tier = tier
        self.embed = nn.Parameter(
            weights["model.embed_tokens.weight"].to(torch.bfloat16), requires_grad=False
        )
        self.register_buffer("norm", norm_weight(config, weights["model.norm.weight"]))
        tied = config.tie_word_embeddings
        head = weights["model.embed_tokens.weight"] if tied else weights.get("lm_head.weight")
        if head is None:
            raise ValueError("weights lack lm_head.weight and the model does not tie embeddings")
        # int8 (per group: GGUF Q8_0's own format) head under int4: int4 logits cost ~20× the KL of all
        # int4 layers (quant_accuracy.py).
        self.lm_head = make_linear(
            head, "int8" if quantization == "int4" else quantization, torch.bfloat16, vnni=True
        )
        cos, sin = rope_tables(config, config.max_position_embeddings)
        self.register_buffer("cos", cos.contiguous(), persistent=False)
        self.register_buffer("sin", sin.contiguous(), persistent=False)
        if config.rope_local_theta is not None:
            cos, sin = rope_tables(config, config.max_position_embeddings, local=True)
        self.register_buffer("cos_local", cos.contiguous(), persistent=False)
        self.register_buffer("sin_local", sin.contiguous(), persistent=False)
        self.layers = nn.ModuleList(
            FusedLayer(config, _layer_weights(weights, i), quantization, config.is_sliding(i))
            for i in range(config.num_layers)
        )
        if draft_head:
            self.draft_head = make_linear(head, "int4", torch.bfloat16, vnni=True)
        self._bind(num_threads)

    def _bind(self, num_threads: int | None) -> None:
        """The C++ model over this module's buffers (built anew after unpickling: `load`)."""
        self.threads = num_threads or default_threads()
        self.impl = self.make_impl(self.threads)

    def make_impl(self, threads: int, ops: ModuleType | None = None):
        """A C++ model over this module's buffers, from the kernels module `ops` (default: this tree's;
        benchmarks/step_ab.py passes an older revision's)."""
        ops = ops or kernels.ops(self.tier)
        c = self.config
        impl = ops.Llama(
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.rms_norm_eps,
            self.embed,
            self.norm,
            _packed(self.lm_head, ops),
            self.cos,
            self.sin,
        )
        impl.set_threads(threads)
        if hasattr(self, "draft_head"):
            impl.set_draft_head(_packed(self.draft_head, ops))
        if not self.plain_llama():  # (an older revision's kernels, step_ab.py's, run plain Llama only)
            impl.set_family(
                c.embed_scale,
                (c.query_pre_attn_scalar or c.head_dim) ** -0.5,
                GATE_ACTIVATIONS[c.activation],
                c.final_logit_softcap or 0.0,
                c.sliding_window or 0,
                self.cos_local,
                self.sin_local,
            )
        for i, layer in enumerate(self.layers):
            impl.add_layer(
                layer.input_norm,
                layer.post_norm,
                _packed(layer.qkv, ops),
                _packed(layer.o, ops),
                _packed(layer.gate_up, ops),
                _packed(layer.down, ops),
            )
            if layer.has_options():
                impl.set_layer_options(i, *layer.options())
        return impl

    def plain_llama(self) -> bool:
        """Llama's decoder with none of the other families' options: the step's defaults."""
        c = self.config
        return (
            c.embed_scale == 1.0
            and c.query_pre_attn_scalar is None
            and c.activation == "silu"
            and c.final_logit_softcap is None
            and not any(layer.has_options() for layer in self.layers)
        )

    def on_tier(self, tier: str) -> FusedLlama:
        """This model's packed weights run by another CPU tier's kernels (a shallow copy: the weights
        are shared, nothing is repacked)."""
        other = copy.copy(self)
        other.tier = tier
        other.impl = other.make_impl(self.threads)
        return other

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("impl", None)  # a view of the buffers, rebuilt by `load`
        return state

    def save(self, path: Path) -> None:
        """The packed model, for `load` to skip dequantizing and quantizing at the next start."""
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(self, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, num_threads: int | None = None) -> FusedLlama:
        # Memory-mapped: pages come in as the first steps read them, shared by every process serving
        # the same file, instead of a read-and-copy of the whole file at start (BENCHMARKS.md, cold start).
        model = torch.load(path, weights_only=False, mmap=True)  # our own cache file (see cached_fused)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a FusedLlama")
        model._bind(num_threads)
        return model.eval()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's K (or V) pool: [blocks, kv_heads, block_size, head_dim] in the kernel's pair layout."""
        if block_size % BLOCK_MULTIPLE:
            raise ValueError(f"the fused step needs a block size that is a multiple of {BLOCK_MULTIPLE}")
        c = self.config
        return (num_blocks, c.num_kv_heads, block_size, c.head_dim)

    def compute_logits(
        self,
        ids: torch.Tensor,
        seqs: torch.Tensor,
        tables: torch.Tensor,
        block_size: int,
        sample_rows: torch.Tensor,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        depth: int | None = None,
        sliding_tables: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits [len(sample_rows), vocab] of a flat batch.

        ids [T]: every sequence's new tokens, sequence after sequence; seqs [S, 2]: per sequence, the
        position of its first new token and how many it has; tables [S, blocks]: block tables.
        depth: run only the first `depth` layers (a draft pass), then the final norm and the draft head.
        sliding_tables [S, blocks]: the sliding layers' tables, when their caches are a pool of their
        own (engine/kv_pools.py); None: every layer's pool is addressed by `tables`.
        """
        depth = self.config.num_layers if depth is None else depth
        if sliding_tables is None:
            return self.impl.forward(ids, seqs, tables, block_size, sample_rows, k_caches, v_caches, depth)
        return self.impl.forward_split(
            ids, seqs, tables, sliding_tables, block_size, sample_rows, k_caches, v_caches, depth
        )


log = logging.getLogger("tailserve.fused")
_PACKING_SOURCES = ("fused.py", "../layers/quant.py", "../layers/linear.py", "llama.py")


def cached_fused(
    model_file: Path,
    quantization: str,
    draft_head: bool,
    num_threads: int | None,
    build: Callable[[], FusedLlama],
) -> FusedLlama:
    """The packed model from the disk cache when this model file, precision and packing code were
    packed before; else `build()` it and store it. A second start of the default model then skips
    ~8 s of dequantizing, quantizing and packing."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    st = model_file.stat()
    h.update(f"{model_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{quantization}|{draft_head}".encode())
    h.update(torch.__version__.encode())
    for name in _PACKING_SOURCES:
        h.update((here / name).resolve().read_bytes())
    path = cache_home() / "packed" / f"{model_file.stem}-{quantization}-{h.hexdigest()[:16]}.pt"
    if path.exists():
        try:
            model = FusedLlama.load(path, num_threads)
            log.info("packed weights loaded from %s", path)
            return model
        except Exception as e:  # a damaged or foreign file: rebuild it
            log.warning("packed weights in %s unusable (%s): packing again", path, e)
    model = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    except OSError as e:
        log.warning("could not cache the packed weights in %s: %s", path, e)
    return model
