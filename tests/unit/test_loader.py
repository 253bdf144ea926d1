"""Model loading: GGUF quant types, the Q/K row permutation, Hugging Face folders, and bad models."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tailserve.llm import LLM
from tailserve.models.loader import ModelLoadError, load_config_and_weights, resolve_model
from tailserve.sampling import SamplingParams
from tailserve.tokenizer import Tokenizer
from tests.unit.test_tokenizer import tiny_bpe_path

HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 512
Q = gguf.GGMLQuantizationType
# One tensor type per weight, so every dequantizer the loader relies on is exercised.
TYPES = {
    "attn_q": Q.F32,
    "attn_k": Q.F16,
    "attn_v": Q.BF16,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q4_1,
    "ffn_down": Q.Q5_1,  # gguf can dequantize K-quants but not write them
}


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's rotary halves (the loader must undo this)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = HIDDEN // HEADS
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (vocab, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * d, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * d, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * d, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * d),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
    }
    return {k: torch.randn(*s, generator=g) * (1.0 if "norm" in k else 0.2) for k, s in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
}


def write_model_gguf(
    path: Path, weights: dict[str, torch.Tensor], arch: str = "llama"
) -> dict[str, np.ndarray]:
    """A one-layer Llama GGUF; returns what each tensor should dequantize to (HF layout)."""
    tok_path = tiny_bpe_path(path.parent / "tok.gguf")
    reader = gguf.GGUFReader(str(tok_path))
    tokens = [str(t) for t in reader.fields["tokenizer.ggml.tokens"].contents()]
    merges = [str(m) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected: dict[str, np.ndarray] = {}
    for hf, name in GGUF_NAMES.items():
        arr = weights[hf].numpy().astype(np.float32)
        stored = arr
        if name.endswith("attn_q.weight"):
            stored = permute_rope_rows(arr, HEADS)
        elif name.endswith("attn_k.weight"):
            stored = permute_rope_rows(arr, KV_HEADS)
        qtype = TYPES.get(name.split(".")[-2], Q.F32)
        if qtype == Q.F32:
            data = stored
        elif qtype == Q.F16:
            data = stored.astype(np.float16)
        else:
            data = gguf.quants.quantize(stored, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype).reshape(stored.shape).astype(np.float32)
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            back = arr if qtype == Q.F32 else back  # permuted storage: compare the F32 one exactly
        expected[hf] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    vocab = len(
        gguf.GGUFReader(str(tiny_bpe_path(path.parent / "probe.gguf"))).fields["tokenizer.ggml.tokens"].data
    )
    weights = hf_weights(vocab)
    expected = write_model_gguf(path, weights)
    return path, weights, expected


def test_gguf_quant_types_dequantize_and_qk_rows_unpermute(tiny_gguf) -> None:
    path, weights, expected = tiny_gguf
    config, loaded = load_config_and_weights(path)
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        HIDDEN,
        HEADS,
        2,
        64,
    )
    assert not config.tie_word_embeddings
    # F32 Q rows come back exactly in the split-halves layout: the permutation was undone.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded[q], weights[q])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.allclose(loaded[k], weights[k], atol=1e-3)  # F16 storage
    for name, want in expected.items():
        if name in (q, k):
            continue
        assert torch.allclose(loaded[name], torch.from_numpy(want), atol=1e-6), name
    for kind in ("gate_proj", "up_proj", "down_proj"):  # 4-bit: close to the original, not equal
        name = f"model.layers.0.mlp.{kind}.weight"
        assert (loaded[name] - weights[name]).abs().mean() < 0.03


def test_llm_runs_from_a_gguf_and_from_an_hf_folder_alike(tiny_gguf, tmp_path: Path) -> None:
    path, _, _ = tiny_gguf
    _, loaded = load_config_and_weights(path)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in loaded.items()}, str(folder / "model.safetensors"))
    vocab = loaded["model.embed_tokens.weight"].shape[0]
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": HIDDEN,
                "intermediate_size": FFN,
                "num_hidden_layers": 1,
                "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
                "max_position_embeddings": 256,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    Tokenizer.from_gguf(path)._backend.save(str(folder / "tokenizer.json"))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = LLM(str(path), dtype="float32", kv_cache_memory=0.01).generate("ab ab hello world", params)[0]
    b = LLM(str(folder), dtype="float32", kv_cache_memory=0.01).generate("ab ab hello world", params)[0]
    assert a.prompt_token_ids == b.prompt_token_ids
    assert len(a.token_ids) == 6 and a.token_ids == b.token_ids


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model("no/such/model.gguf")


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        LLM(str(bad))


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    vocab = len(
        gguf.GGUFReader(str(tiny_bpe_path(tmp_path / "probe.gguf"))).fields["tokenizer.ggml.tokens"].data
    )
    write_model_gguf(path, hf_weights(vocab), arch="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        LLM(str(path))


def test_fast_gguf_reader_reads_the_fields_the_stock_one_does(tiny_gguf, tmp_path: Path) -> None:
    """String, float and int arrays (tokens, scores, types, merges) and scalars, field for field."""
    from tailserve.models.loader import _fast_reader_class
    from tests.unit.test_tokenizer import write_gguf

    spm = write_gguf(
        tmp_path / "spm.gguf",
        model="llama",
        tokens=["<unk>", "<s>", "</s>", "▁a", "é"],
        types=[2, 3, 3, 1, 1],
        token_scores=[0.0, 0.0, 0.0, -1.5, -2.0],
        bos_token_id=1,
    )
    for path in (tiny_gguf[0], spm):
        stock, fast = gguf.GGUFReader(str(path)), _fast_reader_class()(str(path))
        assert list(stock.fields) == list(fast.fields)
        for name, a in stock.fields.items():
            b = fast.fields[name]
            assert (a.offset, a.types, a.data) == (b.offset, b.types, b.data), name
            assert [(p.dtype, p.tolist()) for p in a.parts] == [(p.dtype, p.tolist()) for p in b.parts], name
            assert a.contents() == b.contents(), name
        assert [t.name for t in stock.tensors] == [t.name for t in fast.tensors]
        assert stock.data_offset == fast.data_offset
