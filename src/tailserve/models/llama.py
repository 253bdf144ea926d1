"""The decoder of the Llama family and its relatives (SmolLM2, Llama, Mistral, Qwen2, Qwen3, Gemma 3).

One pre-norm transformer with the options the families differ by (ModelConfig says which apply):
Q/K/V bias (Qwen2), an RMSNorm over each head's q and k (Qwen3, Gemma 3), and for Gemma 3 norms that
scale by (1 + weight), embeddings scaled by √hidden, a GELU-tanh gate, norms on the attention and MLP
outputs, sliding-window attention with its own RoPE base on most layers, and final-logit soft-capping.

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

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the storage dtype, as the reference implementations do; Gemma
        # also scales in float32 (by 1 + weight), Llama after casting back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_tables(config: ModelConfig, max_len: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of every position, [max_len, head_dim], in the split-halves layout. `local`: the
    sliding layers' tables where they have a base of their own (Gemma 3: unscaled)."""
    d = config.head_dim
    theta, factor = config.rope_theta, config.rope_scaling_factor
    if local and config.rope_local_theta is not None:
        theta, factor = config.rope_local_theta, 1.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    inv_freq = inv_freq / factor if factor != 1.0 else inv_freq
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
        self,
        config: ModelConfig,
        w: dict[str, torch.Tensor],
        dtype: torch.dtype,
        quantization: str,
        sliding: bool = False,
    ) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv = c.num_heads, c.num_kv_heads
        self.head_dim = c.head_dim
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.window = c.sliding_window if sliding else None
        self.act = ACTIVATIONS[c.activation]

        def norm(name: str) -> RMSNorm:
            return RMSNorm(w[name].to(dtype), c.rms_norm_eps, c.norm_plus_one)

        self.input_norm = norm("input_layernorm")
        proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        self.qkv = make_linear(torch.cat([w[p] for p in proj]), quantization, dtype)
        self.qkv_bias = (
            nn.Parameter(torch.cat([w[p + ".bias"] for p in proj]).to(dtype), requires_grad=False)
            if c.attention_bias
            else None
        )
        self.q_norm = norm("self_attn.q_norm") if c.qk_norm else None
        self.k_norm = norm("self_attn.k_norm") if c.qk_norm else None
        self.o = make_linear(w["self_attn.o_proj"], quantization, dtype)
        # Gemma 3's sandwich: post_attention_layernorm normalises the attention's output, and the MLP
        # has a norm on each side; in Llama, post_attention_layernorm is the norm before the MLP.
        self.attn_out_norm = norm("post_attention_layernorm") if c.sandwich_norms else None
        self.mlp_norm = norm("pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm")
        self.mlp_out_norm = norm("post_feedforward_layernorm") if c.sandwich_norms else None
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
        qkv = self.qkv(self.input_norm(x))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split([nq, nk, nk], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(t, self.num_kv, self.head_dim)
        if self.window is not None and meta.sliding is not None:
            meta = meta.sliding  # this layer's KV is in the sliding layers' own pool
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        attn = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale, self.window)
        a = self.o(attn.view(t, nq))
        x = x + (a if self.attn_out_norm is None else self.attn_out_norm(a))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        m = self.down(self.act(gate) * up)
        return x + (m if self.mlp_out_norm is None else self.mlp_out_norm(m))


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
        # transformers multiplies by the scale rounded to the activations' dtype (Gemma: √hidden).
        self.embed_scale = torch.tensor(config.embed_scale).to(dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, _layer_weights(weights, i), dtype, quantization, config.is_sliding(i))
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(weights["model.norm.weight"].to(dtype), config.rms_norm_eps, config.norm_plus_one)
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
        self.local_rope = config.rope_local_theta is not None and any(
            config.is_sliding(i) for i in range(config.num_layers)
        )
        if self.local_rope:
            cos, sin = rope_tables(config, config.max_position_embeddings, local=True)
            self.register_buffer("cos_local", cos.to(dtype), persistent=False)
            self.register_buffer("sin_local", sin.to(dtype), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for a flat batch of T tokens."""
        x = F.embedding(input_ids, self.embed)
        if self.config.embed_scale != 1.0:
            x = x * self.embed_scale.to(x.device)
        rope = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        local = rope
        if self.local_rope:
            local = self.cos_local[positions].unsqueeze(1), self.sin_local[positions].unsqueeze(1)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, *(rope if layer.window is None else local), kv, meta)
        return self.norm(x)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's K (or V) pool: a slot per token, [num_blocks · block_size, kv_heads, head_dim]."""
        return (num_blocks * block_size, self.config.num_kv_heads, self.config.head_dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def _layer_weights(w: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {k[len(prefix) :].removesuffix(".weight"): v for k, v in w.items() if k.startswith(prefix)}
