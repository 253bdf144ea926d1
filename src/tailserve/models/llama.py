"""The Llama-family decoder (SmolLM2, Llama, Mistral): RMSNorm, RoPE, grouped-query attention, SwiGLU.

It runs on a flat batch of tokens from many sequences at once; the paged attention layer is the
only part that knows which token belongs to which sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailserve.layers.attention import AttentionMetadata, paged_attention, write_kv
from tailserve.layers.linear import make_linear
from tailserve.models.loader import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the storage dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position, [max_len, head_dim], in the split-halves layout."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D]. Rotates each head's halves: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, w: dict[str, torch.Tensor], dtype: torch.dtype, quantization: str
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.input_norm = RMSNorm(w["input_layernorm"].to(dtype), config.rms_norm_eps)
        qkv = torch.cat([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]])
        self.qkv = make_linear(qkv, quantization, dtype)
        self.o = make_linear(w["self_attn.o_proj"], quantization, dtype)
        self.post_norm = RMSNorm(w["post_attention_layernorm"].to(dtype), config.rms_norm_eps)
        self.gate_up = make_linear(torch.cat([w["mlp.gate_proj"], w["mlp.up_proj"]]), quantization, dtype)
        self.down = make_linear(w["mlp.down_proj"], quantization, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        nq, nk = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        q, k, v = self.qkv(self.input_norm(x)).split([nq, nk, nk], dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.num_kv, self.head_dim), cos, sin)
        v = v.view(t, self.num_kv, self.head_dim)
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        attn = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        x = x + self.o(attn.view(t, nq))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        quantization: str = "none",
    ) -> None:
        """Linears are built (and quantized) from the source weights, the rest is stored in `dtype`."""
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(weights["model.embed_tokens.weight"].to(dtype), requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), dtype, quantization)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"].to(dtype), config.rms_norm_eps)
        tied = config.tie_word_embeddings
        head = weights["model.embed_tokens.weight"] if tied else weights.get("lm_head.weight")
        if head is None:
            raise ValueError("weights lack lm_head.weight and the model does not tie embeddings")
        # The head gets its own (packed) copy when tied, and int8 under int4: int4 logits cost ~20× the
        # KL of all int4 layers together (benchmarks/quant_accuracy.py).
        self.lm_head = make_linear(head, "int8" if quantization == "int4" else quantization, dtype)
        cos, sin = rope_tables(config, config.max_position_embeddings)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for a flat batch of T tokens."""
        x = F.embedding(input_ids, self.embed)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's K (or V) pool: a slot per token, [num_blocks · block_size, kv_heads, head_dim]."""
        return (num_blocks * block_size, self.config.num_kv_heads, self.config.head_dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def _layer_weights(w: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix) :].removesuffix(".weight"): v for k, v in w.items() if k.startswith(prefix)}
