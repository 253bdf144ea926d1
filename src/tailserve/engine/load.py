"""An engine from its config: find the model, choose the step (fused C++ or PyTorch), load the kernels,
the weights (models/fused.py's packed cache) and the config and tokenizer (models/meta_cache.py), each
from its cache when it can be, and time each phase.

The phases land in a `StartupTimer` (obs/startup.py), which the server logs in one line and exports
on /metrics; whoever starts engines (the server, a Ray Serve replica) passes its own timer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.layers import kernels
from tailserve.models.fused import BLOCK_MULTIPLE as FUSED_BLOCK_MULTIPLE
from tailserve.models.fused import FusedLlama, cached_fused, default_threads, fused_supported
from tailserve.models.loader import load_config, load_config_and_weights, resolve_model
from tailserve.models.meta_cache import cached_config, cached_tokenizer
from tailserve.obs.startup import StartupTimer
from tailserve.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported by load_torch_model alone: the fused path never imports torch
    from tailserve.models.llama import LlamaModel

log = logging.getLogger("tailserve.engine")


def gpu_present() -> bool:
    """Whether a GPU driver is there (NVIDIA's, or ROCm's /dev/kfd): only then is PyTorch asked,
    so that a CPU-only start never imports it to learn there is no GPU."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd"))


def resolve_device(device: str) -> str:
    if device == "auto":
        if not gpu_present():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str, fused: bool = False) -> str:
    """`auto` → bf16 on a GPU and on the fused step (every CPU tier runs it in bf16); elsewhere on a CPU,
    bf16 only where the CPU computes it natively."""
    if dtype == "auto":
        if device == "cuda" or fused:
            return "bfloat16"
        import torch

        return "bfloat16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dtype


QUANTIZATIONS = ("none", "int8", "int4", "auto")


def resolve_quantization(quantization: str, checkpoint: str, fused: bool) -> str:
    """`auto` → the checkpoint's own precision on the fused step, where decode reads every weight byte
    per step and int4 runs 2.5-3× faster than bf16 at batch 1 and as fast from batch 8 (BENCHMARKS.md);
    a Q4_1 GGUF's weights are then served exactly. Elsewhere `auto` → none (bf16/fp32)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "auto":
        return quantization
    return checkpoint if fused else "none"


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def load_fused(
    path: Path, quantization: str, draft_head: bool, threads: int, weight_cache: bool
) -> FusedLlama:
    """The fused model of a checkpoint, from the packed-weight cache when it can be."""

    def build() -> FusedLlama:
        mc, weights = load_config_and_weights(path)
        return FusedLlama.pack(mc, weights, quantization, draft_head, num_threads=threads)

    if weight_cache and path.is_file():
        return cached_fused(path, quantization, draft_head, threads, build)
    return build()


def load_draft(name: str, target_path: Path, threads: int, weight_cache: bool) -> FusedLlama:
    """A separate draft model (name or path) in its checkpoint's own precision; it must tokenize as the
    target does, or its guesses would be other tokens' ids."""
    path = resolve_model(name)
    mc = load_config(path)
    if not fused_supported(mc):
        raise ValueError(f"draft model {name!r}: its shape does not run on the fused step")
    if not Tokenizer.load(path).same_vocabulary(Tokenizer.load(target_path)):
        raise ValueError(f"draft model {name!r} does not share the target's tokenizer")
    quantization = resolve_quantization("auto", mc.weight_precision, True)
    draft = load_fused(path, quantization, False, threads, weight_cache)
    log.info("draft model %s: %s weights", path.name, mc.weight_precision)
    return draft


def load_torch_model(
    path: Path, config: EngineConfig, device: str, dtype: str, quantization: str
) -> LlamaModel:
    """The PyTorch model (models/llama.py): the one path that imports torch to serve."""
    import torch

    from tailserve.models.llama import LlamaModel

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model_config, weights = load_config_and_weights(path)
    weights = {k: v.to(device) for k, v in weights.items()}
    return LlamaModel(model_config, weights, getattr(torch, dtype), quantization).to(device).eval()


def load_engine(config: EngineConfig, timer: StartupTimer | None = None) -> LLMEngine:
    """The engine `config` describes; each phase of the load is lapped on `timer` when given."""
    timer = timer or StartupTimer(started=0.0)  # a throwaway clock: laps cost nothing

    path = resolve_model(config.model)
    model_config = cached_config(path)
    timer.lap("model_config", next_phase="kernels")
    device = resolve_device(config.device)
    fused_shape = (
        config.fused
        and config.block_size % FUSED_BLOCK_MULTIPLE == 0
        and device == "cpu"
        and fused_supported(model_config)
    )
    dtype = resolve_dtype(config.dtype, device, fused_shape)
    fused = fused_shape and dtype == "bfloat16"
    quantization = resolve_quantization(config.quantization, model_config.weight_precision, fused)
    # A draft model is named, or "layers:N" (the default) takes the target's own first layers.
    draft_name = config.draft_model or ""
    separate = config.speculative == "draft" and draft_name != "" and not draft_name.startswith("layers:")
    model: FusedLlama | LlamaModel
    draft: FusedLlama | None = None
    if fused:
        tier = kernels.active_tier()  # built once per tier and cached; loaded here
        timer.lap("kernels", next_phase="weights")
        threads = config.num_threads or default_threads()
        self_draft = config.speculative == "draft" and not separate  # needs the target's draft head
        model = load_fused(path, quantization, self_draft, threads, config.weight_cache)
        if separate:
            draft = load_draft(draft_name, path, threads, config.weight_cache)
    else:
        tier = None
        model = load_torch_model(path, config, device, dtype, quantization)
    timer.lap("weights", next_phase="tokenizer")
    log.info(
        "model %s: %s step, %s activations, weights %s (checkpoint: %s)",
        path.name,
        f"fused C++ (CPU tier {tier})" if fused else "PyTorch",
        dtype,
        quantization,
        model_config.weight_precision,
    )
    tokenizer = cached_tokenizer(path)
    timer.lap("tokenizer", next_phase="engine")
    engine = LLMEngine(config, model, tokenizer, draft)
    timer.lap("engine")
    return engine
