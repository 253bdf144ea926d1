"""A checkpoint's weights packed for the fused step (models/fused.py): quantized, laid out as the C++
linears read them (layers/linear.py, layers/quant.py), norms in fp32 with Gemma's 1 + w folded in,
RoPE tables computed. PyTorch does the packing, once per model file and precision: the result is
numpy arrays, which the packed-weight cache stores and every later start maps without torch."""

from __future__ import annotations

import numpy as np
import torch

from tailserve.layers.linear import make_linear
from tailserve.models.fused import SWIGLU_HALF, PackedLayer, PackedLinear, PackedModel
from tailserve.models.llama import _layer_weights, rope_tables
from tailserve.models.loader import ModelConfig


def _array(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy, bf16 as its bits (uint16)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, K] gate and up → [2I, K] in blocks of 32 rows: 16 gate rows, then the same 16 up rows."""
    i, k = gate.shape
    h = SWIGLU_HALF
    return torch.stack([gate.reshape(i // h, h, k), up.reshape(i // h, h, k)], 1).reshape(2 * i, k)


def packed_linear(weight: torch.Tensor, quantization: str) -> PackedLinear:
    """One source weight [out, in] quantized and packed for the C++ linears (kinds: csrc/linear.h)."""
    layer = make_linear(weight, quantization, torch.bfloat16, vnni=True)
    kind, w, s, group = layer.kernel_weight()  # (the fused step needs the C++ linears)
    scales = None if s is None else _array(s)
    return PackedLinear(kind, _array(w).view(np.uint8), scales, layer.out_features, layer.in_features, group)


def norm_weight(config: ModelConfig, w: torch.Tensor) -> np.ndarray:
    """An RMSNorm's weight as the C++ step multiplies by it: fp32, with Gemma's 1 + w folded in."""
    return _array(w.float() + 1.0 if config.norm_plus_one else w.float())


def pack_layer(
    config: ModelConfig, w: dict[str, torch.Tensor], quantization: str, sliding: bool
) -> PackedLayer:
    c = config
    # The norm before the MLP: Gemma 3's pre_feedforward_layernorm; Llama's post_attention_layernorm.
    pre_mlp = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    options = {
        "qkv_bias": _array(torch.cat([w[p + ".bias"] for p in proj]).float()) if c.attention_bias else None,
        "q_norm": norm_weight(c, w["self_attn.q_norm"]) if c.qk_norm else None,
        "k_norm": norm_weight(c, w["self_attn.k_norm"]) if c.qk_norm else None,
        "attn_out_norm": norm_weight(c, w["post_attention_layernorm"]) if c.sandwich_norms else None,
        "mlp_out_norm": norm_weight(c, w["post_feedforward_layernorm"]) if c.sandwich_norms else None,
    }
    return PackedLayer(
        input_norm=norm_weight(c, w["input_layernorm"]),
        post_norm=norm_weight(c, w[pre_mlp]),
        qkv=packed_linear(torch.cat([w[p] for p in proj]), quantization),
        o=packed_linear(w["self_attn.o_proj"], quantization),
        gate_up=packed_linear(interleave_gate_up(w["mlp.gate_proj"], w["mlp.up_proj"]), quantization),
        down=packed_linear(w["mlp.down_proj"], quantization),
        options={k: v for k, v in options.items() if v is not None},
        sliding=sliding,
    )


@torch.inference_mode()
def pack_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    quantization: str = "none",
    draft_head: bool = False,
) -> PackedModel:
    """Linears quantized from the source weights. Activations run in bf16; int8 and int4 layers take them
    quantized to int8 per group of 32 (vpdpbusd, as llama.cpp does with the same GGUF weights): ~1.3×
    faster than bf16 activations from 4 rows up, at a KL of ~0.003 against fp32 instead of ~0.001
    (BENCHMARKS.md).

    draft_head: also an int4 copy of the head for draft passes (`depth` < layers). The head is ~30 %
    of the bytes an int4 step reads, so a shallow draft is cheap only with a cheap head; its error can
    cost acceptance, never exactness (the full pass verifies every draft)."""
    tied = config.tie_word_embeddings
    head = weights["model.embed_tokens.weight"] if tied else weights.get("lm_head.weight")
    if head is None:
        raise ValueError("weights lack lm_head.weight and the model does not tie embeddings")
    cos, sin = rope_tables(config, config.max_position_embeddings)
    if config.rope_local_theta is not None:
        cos_local, sin_local = rope_tables(config, config.max_position_embeddings, local=True)
    else:
        cos_local, sin_local = cos, sin
    return PackedModel(
        embed=_array(weights["model.embed_tokens.weight"].to(torch.bfloat16)),
        norm=norm_weight(config, weights["model.norm.weight"]),
        # int8 (per group: GGUF Q8_0's own format) head under int4: int4 logits cost ~20× the KL of all
        # int4 layers (quant_accuracy.py).
        head=packed_linear(head, "int8" if quantization == "int4" else quantization),
        draft_head=packed_linear(head, "int4") if draft_head else None,
        rope=(_array(cos), _array(sin), _array(cos_local), _array(sin_local)),
        layers=[
            pack_layer(config, _layer_weights(weights, i), quantization, config.is_sliding(i))
            for i in range(config.num_layers)
        ],
    )
