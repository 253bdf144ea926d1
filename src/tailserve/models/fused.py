"""Every family's decoder as one C++ call per step (csrc/llama.h), on every CPU tier (layers/kernels.py).

Llama's step, plus the other families' options (models/llama.py's table) passed to it as flags and
per-layer arrays: Q/K/V bias, per-head Q/K norms, (1 + w) norms (the 1 folded into the fp32 weights),
the embedding scale, Gemma's output norms, GELU-tanh gate, query scale, sliding windows with their own
RoPE tables, and final-logit soft-capping. A plain Llama model sets none of them, so its step is
Llama's as it was. The same math as models/llama.py, which stays the reference and the path everywhere
else (GPU, fp32, no compiler). Eager PyTorch spends most of a small model's decode step dispatching
~600 tiny ops; here the step is one call that releases the GIL. Each row's numbers depend only on its
own sequence (no reduction spans rows), so a sequence gets bitwise the same logits alone, batched,
chunked, or verified several tokens at a time.

This module needs no PyTorch: the packed weights are numpy arrays (mapped from the packed-weight
cache, models/packed_file.py), the KV pools numpy arrays of bf16 bits, the kernels a C library.
Packing a checkpoint (models/fused_pack.py) is the one part that uses torch, once per model file.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailserve.layers import kernels
from tailserve.layers.kernels import Kernels, TsBatch, TsCaches, TsLinear
from tailserve.models import packed_file
from tailserve.models.loader import ModelConfig, cache_home

SWIGLU_HALF = 16  # gate/up rows per half-block of the packed layout (csrc/linear.h: SwiGlu)
BLOCK_MULTIPLE = 16  # the KV block size must be a multiple of this (csrc/attention.h: pair layout)
GATE_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the gate's activation as Llama::set_family takes it
OPTIONS = ("qkv_bias", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")  # Llama::set_layer_options
PHASES = ("embed", "norm", "qkv", "rope_kv", "attention", "o", "gate_up", "down", "head")  # Llama::Phase
KV_DTYPE = np.uint16  # the KV pools hold bf16 bits


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


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _f32(a: np.ndarray, n: int, what: str) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.size != n:
        raise ValueError(f"{what}: fp32 [{n}]")
    return a


@dataclass
class PackedLinear:
    """A linear's packed weight (kinds: csrc/linear.h) as bytes, its scales, and its shape."""

    kind: int
    w: np.ndarray  # uint8
    s: np.ndarray | None  # int8: fp32 [N padded to 32]; the grouped kinds: fp16 (scale, min) pairs
    n: int
    k: int
    group: int

    def c(self) -> TsLinear:
        s = self.s
        return TsLinear(
            self.kind,
            _ptr(self.w),
            self.w.nbytes,
            _ptr(s),
            0 if s is None else s.size,
            self.n,
            self.k,
            self.group,
        )


@dataclass
class PackedLayer:
    input_norm: np.ndarray  # fp32 [hidden]
    post_norm: np.ndarray  # fp32 [hidden]: the norm before the MLP
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear  # gate and up interleaved in 16-row halves (the SwiGlu epilogue's layout)
    down: PackedLinear
    options: dict[str, np.ndarray] = field(default_factory=dict)  # of OPTIONS, those the family has
    sliding: bool = False


@dataclass
class PackedModel:
    """Every array the C++ model reads (models/fused_pack.py builds it; the cache stores it)."""

    embed: np.ndarray  # bf16 bits [vocab, hidden]
    norm: np.ndarray  # fp32 [hidden]
    head: PackedLinear
    draft_head: PackedLinear | None
    rope: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # cos, sin, and the sliding layers' own
    layers: list[PackedLayer]


def default_threads() -> int:
    """The step's thread team when none is set: $OMP_NUM_THREADS if set, else the cores this process
    may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


class _Impl:
    """The C++ model (Llama in csrc/llama.h) over a packed model's arrays; freed with this object."""

    def __init__(self, lib: Kernels, handle: ctypes.c_void_p, packed: PackedModel) -> None:
        self.lib, self.handle, self.packed = lib, handle, packed  # (the arrays outlive the handle)

    def __del__(self) -> None:
        if self.handle:
            self.lib.lib.ts_llama_free(self.handle)

    def call(self, name: str, *args) -> None:
        self.lib.call(name, self.handle, *args)

    def take_phase_seconds(self) -> dict[str, float]:
        """Wall seconds spent in each phase of the step since the last call, then reset."""
        out = (ctypes.c_double * len(PHASES))()
        self.call("ts_llama_take_phase_seconds", out)
        return dict(zip(PHASES, out))


class FusedLlama:
    def __init__(
        self,
        config: ModelConfig,
        packed: PackedModel,
        num_threads: int | None = None,
        tier: str | None = None,
    ) -> None:
        """The fused model over packed weights (`pack` packs a checkpoint's). num_threads: threads that
        run a step (default: the cores); tier: the CPU tier's kernels to run (default: the chosen one;
        tests run each). The packed weights are the same on every tier."""
        if not fused_supported(config, tier):
            raise RuntimeError("the fused step needs the C++ kernels (a compiler) and a supported shape")
        self.config = config
        self.packed = packed
        self.tier = tier
        self.threads = num_threads or default_threads()
        self.impl = self.make_impl(self.threads)

    @classmethod
    def pack(
        cls,
        config: ModelConfig,
        weights: dict,
        quantization: str = "none",
        draft_head: bool = False,
        num_threads: int | None = None,
        tier: str | None = None,
    ) -> FusedLlama:
        """A checkpoint's weights (name → torch tensor) packed (models/fused_pack.py: PyTorch, imported
        only here) at `quantization`; draft_head: also an int4 head for draft passes."""
        from tailserve.models.fused_pack import pack_model

        return cls(config, pack_model(config, weights, quantization, draft_head), num_threads, tier)

    def make_impl(self, threads: int, lib: Kernels | None = None) -> _Impl:
        """A C++ model over this model's arrays, from the kernels `lib` (default: this tree's, at this
        model's tier; benchmarks/step_ab.py passes another revision's)."""
        lib = lib or kernels.ops(self.tier)
        c, p = self.config, self.packed
        vocab, hidden = p.embed.shape
        cos, sin, cos_local, sin_local = p.rope
        positions = cos.shape[0]
        for t in p.rope:
            _f32(t, positions * c.head_dim, "rope tables")
        handle = ctypes.c_void_p()
        head = p.head.c()
        lib.call(
            "ts_llama_new", c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, _ptr(p.embed), vocab,
            hidden, _ptr(_f32(p.norm, hidden, "final norm")), ctypes.byref(head), _ptr(cos), _ptr(sin),
            positions, ctypes.byref(handle),
        )  # fmt: skip
        impl = _Impl(lib, handle, p)
        impl.call("ts_llama_set_threads", threads)
        if p.draft_head is not None:
            impl.call("ts_llama_set_draft_head", ctypes.byref(p.draft_head.c()))
        if not self.plain_llama():
            impl.call(
                "ts_llama_set_family",
                c.embed_scale,
                (c.query_pre_attn_scalar or c.head_dim) ** -0.5,
                GATE_ACTIVATIONS[c.activation],
                c.final_logit_softcap or 0.0,
                c.sliding_window or 0,
                _ptr(cos_local),
                _ptr(sin_local),
            )
        sizes = {
            "qkv_bias": (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
            "q_norm": c.head_dim,
            "k_norm": c.head_dim,
            "attn_out_norm": hidden,
            "mlp_out_norm": hidden,
        }
        for i, layer in enumerate(p.layers):
            linears = [ctypes.byref(lin.c()) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            norms = [_f32(layer.input_norm, hidden, "input norm"), _f32(layer.post_norm, hidden, "post norm")]
            impl.call("ts_llama_add_layer", *map(_ptr, norms), *linears)
            if layer.options or layer.sliding:
                opts = [layer.options.get(n) for n in OPTIONS]
                opts = [None if a is None else _f32(a, sizes[n], n) for n, a in zip(OPTIONS, opts)]
                impl.call("ts_llama_set_layer_options", i, *map(_ptr, opts), layer.sliding)
        return impl

    def plain_llama(self) -> bool:
        """Llama's decoder with none of the other families' options: the step's defaults."""
        c = self.config
        return (
            c.embed_scale == 1.0
            and c.query_pre_attn_scalar is None
            and c.activation == "silu"
            and c.final_logit_softcap is None
            and not any(layer.options or layer.sliding for layer in self.packed.layers)
        )

    def on_tier(self, tier: str) -> FusedLlama:
        """This model's packed weights run by another CPU tier's kernels (a shallow copy: the weights
        are shared, nothing is repacked)."""
        other = copy.copy(self)
        other.tier = tier
        other.impl = other.make_impl(self.threads)
        return other

    def save(self, path: Path) -> None:
        """The packed model, for `load` to skip dequantizing and quantizing at the next start."""
        packed_file.save((self.config, self.packed), path)

    @classmethod
    def load(cls, path: Path, num_threads: int | None = None) -> FusedLlama:
        """A saved model, its arrays mapped from the file: pages come in as the first steps read them,
        shared by every process serving the same file (BENCHMARKS.md, cold start)."""
        config, packed = packed_file.load(path)  # our own cache file (see cached_fused)
        if not isinstance(config, ModelConfig) or not isinstance(packed, PackedModel):
            raise TypeError(f"{path} does not hold a packed model")
        return cls(config, packed, num_threads)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's K (or V) pool: [blocks, kv_heads, block_size, head_dim] in the kernel's pair layout."""
        if block_size % BLOCK_MULTIPLE:
            raise ValueError(f"the fused step needs a block size that is a multiple of {BLOCK_MULTIPLE}")
        c = self.config
        return (num_blocks, c.num_kv_heads, block_size, c.head_dim)

    def caches(self, k_caches: Sequence[np.ndarray], v_caches: Sequence[np.ndarray]) -> TsCaches:
        """Every layer's K and V pool as the step takes them, checked once (bf16 bits, the pair layout);
        the arrays must outlive the result."""
        c = self.config
        if len(k_caches) != c.num_layers or len(v_caches) != c.num_layers:
            raise ValueError("one K and one V cache per layer")
        for k, v in zip(k_caches, v_caches):
            if (
                k.dtype != KV_DTYPE
                or v.dtype != KV_DTYPE
                or not (
                    k.flags.c_contiguous and v.flags.c_contiguous and k.flags.writeable and v.flags.writeable
                )
                or k.shape != v.shape
                or k.ndim != 4
                or k.shape[1:] != (c.num_kv_heads, k.shape[2], c.head_dim)
            ):
                raise ValueError(
                    "caches: bf16 bits (uint16) [blocks, kv_heads, block_size, head_dim], writable"
                )
        n = c.num_layers
        ks = (ctypes.c_void_p * n)(*[_ptr(k) for k in k_caches])
        vs = (ctypes.c_void_p * n)(*[_ptr(v) for v in v_caches])
        blocks = (ctypes.c_int64 * n)(*[k.shape[0] for k in k_caches])
        caches = TsCaches(ctypes.cast(ks, ctypes.c_void_p), ctypes.cast(vs, ctypes.c_void_p),
                          ctypes.cast(blocks, ctypes.c_void_p), n)  # fmt: skip
        caches._keep = (ks, vs, blocks, list(k_caches), list(v_caches))
        return caches

    def step(
        self,
        ids: np.ndarray,
        seqs: np.ndarray,
        tables: np.ndarray,
        block_size: int,
        sample_rows: np.ndarray,
        caches: TsCaches,
        depth: int | None = None,
        sliding_tables: np.ndarray | None = None,
    ) -> np.ndarray:
        """fp32 logits [len(sample_rows), vocab] of a flat batch.

        ids [T]: every sequence's new tokens, sequence after sequence; seqs [S, 2]: per sequence, the
        position of its first new token and how many it has; tables [S, blocks]: block tables (all int64).
        depth: run only the first `depth` layers (a draft pass), then the final norm and the draft head.
        sliding_tables [S, blocks]: the sliding layers' tables, when their caches are a pool of their
        own (engine/kv_pools.py); None: every layer's pool is addressed by `tables`.
        """
        ids, seqs, tables, rows = (
            np.ascontiguousarray(a, np.int64) for a in (ids, seqs, tables, sample_rows)
        )
        if seqs.ndim != 2 or seqs.shape[1] != 2 or tables.ndim != 2 or tables.shape[0] != seqs.shape[0]:
            raise ValueError("seqs [S, 2] and tables [S, blocks]")
        split = sliding_tables is not None
        if split:
            sliding_tables = np.ascontiguousarray(sliding_tables, np.int64)
            if sliding_tables.ndim != 2 or sliding_tables.shape[0] != seqs.shape[0]:
                raise ValueError("sliding_tables [S, blocks]")
        batch = TsBatch(
            _ptr(ids), ids.size, _ptr(seqs), seqs.shape[0], _ptr(tables), tables.shape[1],
            _ptr(sliding_tables) if split else None, sliding_tables.shape[1] if split else 0,
            block_size, _ptr(rows), rows.size,
        )  # fmt: skip
        out = np.empty((rows.size, self.packed.head.n), np.float32)
        depth = self.config.num_layers if depth is None else depth
        self.impl.call("ts_llama_step", ctypes.byref(batch), ctypes.byref(caches), depth, _ptr(out))
        return out

    def compute_logits(
        self,
        ids: np.ndarray,
        seqs: np.ndarray,
        tables: np.ndarray,
        block_size: int,
        sample_rows: np.ndarray,
        k_caches: Sequence[np.ndarray],
        v_caches: Sequence[np.ndarray],
        depth: int | None = None,
        sliding_tables: np.ndarray | None = None,
    ) -> np.ndarray:
        """`step` with the pools given as lists (checked at each call)."""
        caches = self.caches(k_caches, v_caches)
        return self.step(ids, seqs, tables, block_size, sample_rows, caches, depth, sliding_tables)


log = logging.getLogger("tailserve.fused")
_PACKING_SOURCES = (
    "fused.py",
    "fused_pack.py",
    "packed_file.py",
    "../layers/quant.py",
    "../layers/linear.py",
    "llama.py",
)


def cached_fused(
    model_file: Path,
    quantization: str,
    draft_head: bool,
    num_threads: int | None,
    build: Callable[[], FusedLlama],
) -> FusedLlama:
    """The packed model from the disk cache when this model file, precision and packing code were
    packed before; else `build()` it and store it. A second start of the default model then skips
    ~8 s of dequantizing, quantizing and packing, and never imports torch."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    st = model_file.stat()
    h.update(f"{model_file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{quantization}|{draft_head}".encode())
    for name in _PACKING_SOURCES:
        h.update((here / name).resolve().read_bytes())
    path = cache_home() / "packed" / f"{model_file.stem}-{quantization}-{h.hexdigest()[:16]}.pack"
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
