"""Tiny random-weight Llama models and engines, built in code, for fast engine tests."""

from __future__ import annotations

import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.models.fused import FusedLlama, fused_supported
from tailserve.models.llama import LlamaModel
from tests.conftest import TIERS
from tests.tiny_weights import TINY, tiny_weights


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaModel:
    return LlamaModel(TINY, tiny_weights(seed=seed), dtype).eval()


def tiny_fused_model(
    seed: int = 0, quantization: str = "none", draft_head: bool = False, tier: str | None = None
) -> FusedLlama:
    return FusedLlama.pack(TINY, tiny_weights(seed=seed), quantization, draft_head, tier=tier)


# The model paths every engine-level equality must hold on: the PyTorch reference in fp32, and the
# fused C++ step in bf16 at each CPU tier (a tier this CPU cannot run, or no compiler: skips, saying why).
NO_FUSED = pytest.mark.skipif(not fused_supported(TINY), reason="the fused step needs a C++ compiler")
MODEL_KINDS = [
    pytest.param("torch"),
    *(pytest.param(f"fused-{t.values[0]}", marks=[NO_FUSED, *t.marks]) for t in TIERS),
]


def tiny_model_of(kind: str, seed: int = 0) -> LlamaModel | FusedLlama:
    """ "torch", or "fused-<tier>"."""
    return tiny_model(seed) if kind == "torch" else tiny_fused_model(seed, tier=kind.removeprefix("fused-"))


def tiny_engine(
    model: LlamaModel | FusedLlama | None = None, draft: FusedLlama | None = None, **options
) -> LLMEngine:
    options.setdefault("kv_cache_memory", 0.01)
    # Small blocks cross block boundaries often; the fused step's KV layout needs multiples of 16.
    options.setdefault("block_size", 16 if isinstance(model, FusedLlama) else 4)
    return LLMEngine(EngineConfig(model="tiny", **options), model or tiny_model(), draft=draft)


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; every request's output token ids."""
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got
