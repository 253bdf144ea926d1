"""The tiny random-weight Llama's shape and weights, and the same model as a Hugging Face folder on disk.

Apart from tests/tiny.py so that what runs in other processes (cluster replicas load models by path)
can be built without importing the kernels (tests/tiny.py checks the fused step at import, which may
wait on a kernels build another process holds).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tailserve.models.loader import ModelConfig

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


def write_hf_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny model as a Hugging Face folder (config.json, safetensors, a byte-level tokenizer.json
    with ChatML's special tokens), so processes that load models by path (replicas) can serve it."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*specials, *alphabet])}
    tok = Backend(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    config = dataclasses.replace(TINY, vocab_size=len(vocab), bos_token_id=1, eos_token_ids=[2])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    weights = tiny_weights(config, seed=seed)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_layers,
                "num_attention_heads": config.num_heads,
                "num_key_value_heads": config.num_kv_heads,
                "head_dim": config.head_dim,
                "rope_theta": config.rope_theta,
                "rms_norm_eps": config.rms_norm_eps,
                "max_position_embeddings": config.max_position_embeddings,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return folder
