"""Tiny random-weight Llama models and engines, built in code, for fast engine tests."""

from __future__ import annotations

import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.models.fused import FusedLlama, fused_supported
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import ModelConfig
from tests.conftest import TIERS

TINY = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_ids=[2],
)


def tiny_weights(config: ModelConfig = TINY, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Random weights large enough that next-token logits are well separated (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    w = {
        "model.embed_tokens.weight": rnd(config.vocab_size, h) * 3,
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rnd(config.vocab_size, h),
    }
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        w |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rnd(config.num_heads * d, h),
            p + "self_attn.k_proj.weight": rnd(config.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": rnd(config.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": rnd(h, config.num_heads * d),
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
        }
    return w


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaModel:
    return LlamaModel(TINY, tiny_weights(seed=seed), dtype).eval()


def tiny_fused_model(
    seed: int = 0, quantization: str = "none", draft_head: bool = False, tier: str | None = None
) -> FusedLlama:
    return FusedLlama(TINY, tiny_weights(seed=seed), quantization, draft_head, tier=tier).eval()


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
