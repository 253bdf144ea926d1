"""An engine from its config: find the model, choose the step (fused C++ or PyTorch), load the kernels,
the weights (models/fused.py's packed cache) and the config and tokenizer (models/meta_cache.py), each
from its cache when it can be, and time each phase.

The phases land in a `StartupTimer` (obs/startup.py), which the server logs in one line and exports
on /metrics; whoever starts engines (the server, a Ray Serve replica) passes its own timer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine, resolve_device, resolve_dtype, resolve_quantization
from tailserve.layers import kernels
from tailserve.models.fused import BLOCK_MULTIPLE as FUSED_BLOCK_MULTIPLE
from tailserve.models.fused import FusedLlama, cached_fused, default_threads, fused_supported
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config, load_config_and_weights, resolve_model
from tailserve.models.meta_cache import cached_config, cached_tokenizer
from tailserve.obs.startup import StartupTimer
from tailserve.tokenizer import Tokenizer

log = logging.getLogger("tailserve.engine")


def load_fused(
    path: Path, quantization: str, draft_head: bool, threads: int, weight_cache: bool
) -> FusedLlama:
    """The fused model of a checkpoint, from the packed-weight cache when it can be."""

    def build() -> FusedLlama:
        mc, weights = load_config_and_weights(path)
        return FusedLlama(mc, weights, quantization, draft_head, num_threads=threads).eval()

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


def load_engine(config: EngineConfig, timer: StartupTimer | None = None) -> LLMEngine:
    """The engine `config` describes; each phase of the load is lapped on `timer` when given."""
    timer = timer or StartupTimer(started=0.0)  # a throwaway clock: laps cost nothing

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
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
    fused = fused_shape and dtype == torch.bfloat16
    quantization = resolve_quantization(config.quantization, model_config.weight_precision, fused)
    # A draft model is named, or "layers:N" (the default) takes the target's own first layers.
    draft_name = config.draft_model or ""
    separate = config.speculative == "draft" and draft_name != "" and not draft_name.startswith("layers:")
    model: LlamaModel | FusedLlama
    draft: FusedLlama | None = None
    if fused:
        tier = kernels.active_tier()  # built once per tier and cached; loaded here
        timer.lap("kernels", next_phase="weights")
        threads = config.num_threads or default_threads()
        self_draft = config.speculative == "draft" and not separate  # needs the target's draft head
        model = load_fused(path, quantization, self_draft, threads, config.weight_cache)
        if separate:
            draft = load_draft(draft_name, path, threads, config.weight_cache)
        # The step runs on its own thread team; PyTorch's (OpenMP) team, woken by the few torch
        # ops around a step, would spin against it for the cores.
        torch.set_num_threads(1)
    else:
        tier = None
        model_config, weights = load_config_and_weights(path)
        weights = {k: v.to(device) for k, v in weights.items()}
        model = LlamaModel(model_config, weights, dtype, quantization).to(device).eval()
        del weights
    timer.lap("weights", next_phase="tokenizer")
    log.info(
        "model %s: %s step, %s activations, weights %s (checkpoint: %s)",
        path.name,
        f"fused C++ (CPU tier {tier})" if fused else "PyTorch",
        str(dtype).removeprefix("torch."),
        quantization,
        model_config.weight_precision,
    )
    tokenizer = cached_tokenizer(path)
    timer.lap("tokenizer", next_phase="engine")
    engine = LLMEngine(config, model, tokenizer, draft)
    timer.lap("engine")
    return engine
