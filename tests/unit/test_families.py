"""Qwen2, Qwen3 and Gemma 3: greedy output token for token as Hugging Face transformers', on tiny
random-weight models built here from a transformers config (no download), loaded back from the
saved Hugging Face folder; one at a time, batched with chunked prefill, and from the prefix cache.

The prompts are longer than the sliding windows (8 tokens), chunks (12) end inside and across
windows, and blocks (4 tokens) are smaller than a window: every case of the windowed paged path runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.models.fused import FusedLlama, fused_supported
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import ModelLoadError, load_config, load_config_and_weights
from tailserve.sampling import SamplingParams
from tailserve.tokenizer import Tokenizer
from tests.unit.test_tokenizer import tiny_bpe_path

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 10
WINDOW = 8
SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
GEMMA = {
    **SMALL,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "query_pre_attn_scalar": 24,
    "rope_theta": 1e6,
    "rope_local_base_freq": 100.0,
}

CASES = {
    "qwen2-untied": ("Qwen2Config", {**SMALL, "tie_word_embeddings": False}),
    "qwen2-tied-sliding": (
        "Qwen2Config",
        {
            **SMALL,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
    ),
    "qwen3-tied": ("Qwen3Config", {**SMALL, "tie_word_embeddings": True}),
    "qwen3-untied": ("Qwen3Config", {**SMALL, "tie_word_embeddings": False}),
    "gemma3": ("Gemma3TextConfig", GEMMA),
    "gemma3-capped-scaled": (
        "Gemma3TextConfig",
        {
            **GEMMA,
            "final_logit_softcapping": 5.0,
            "attn_logit_softcapping": 3.0,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "tie_word_embeddings": False,
        },
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory) -> tuple[Path, object]:
    """A saved Hugging Face folder of a tiny random model of one family, and that model."""
    config_cls, options = CASES[request.param]
    config = getattr(transformers, config_cls)(**options)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    gemma = "gemma" in config_cls.lower()
    with torch.no_grad():
        # Weights large enough that next-token logits are well separated (no near-ties), and
        # embeddings small enough (Gemma scales them by √hidden = 8) that attention, the sliding
        # window included, moves the residual stream.
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if gemma else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * ((0.125 if gemma else 1.0) if "embed" in name else 0.3))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    ref.generation_config.eos_token_id = None  # greedy to the end, as ignore_eos: EOS may be the argmax
    return folder, ref


def prompts() -> list[list[int]]:
    """Five prompts of 3 to 37 tokens (most beyond the window), two sharing a 20-token prefix."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 256, (20,), generator=g).tolist()
    rest = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 13, 29, 17, 9)]
    return [rest[0], rest[1], rest[2], shared + rest[3], shared + rest[4]]


def reference(ref, ps: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Per prompt, transformers' greedy tokens and their log-probabilities."""
    outs = []
    with torch.inference_mode():
        for p in ps:
            gen = ref.generate(
                torch.tensor([p]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
            ids = gen.sequences[0, len(p) :].tolist()
            assert len(ids) == NEW_TOKENS
            logprobs = [torch.log_softmax(x[0].float(), -1)[t].item() for x, t in zip(gen.logits, ids)]
            outs.append((ids, logprobs))
    return outs


def run(eng: LLMEngine) -> dict[str, tuple[list[int], list[float]]]:
    """Step until idle; every request's tokens and their log-probabilities."""
    got: dict[str, tuple[list[int], list[float]]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            ids, logprobs = got.setdefault(out.request_id, ([], []))
            ids.extend(out.new_token_ids)
            logprobs.extend(lp.logprob for lp in out.logprobs or [])
    return got


def assert_same(got: tuple[list[int], list[float]], want: tuple[list[int], list[float]]) -> None:
    """Token for token; log-probabilities to fp32 rounding (a wrong window shifts them even where the
    argmax survives)."""
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-3)


def engine(folder: Path, **options) -> LLMEngine:
    config, weights = load_config_and_weights(folder)
    model = LlamaModel(config, weights, torch.float32).eval()
    options = {"kv_cache_memory": 0.01, "block_size": 4, **options}
    return LLMEngine(EngineConfig(model=folder.name, **options), model)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)


def test_one_at_a_time_batched_and_cached_match_transformers(family) -> None:
    folder, ref = family
    ps = prompts()
    want = reference(ref, ps)

    one = engine(folder, prefix_cache=False)
    for p, w in zip(ps, want):
        one.add_request("r", p, greedy())
        assert_same(run(one)["r"], w)

    together = engine(folder, prefix_cache=False, max_num_batched_tokens=12, max_num_seqs=5)
    for i, p in enumerate(ps):
        together.add_request(str(i), p, greedy())
    got = run(together)
    for i, w in enumerate(want):
        assert_same(got[str(i)], w)
    assert together.block_manager.num_free_blocks == together.block_manager.num_blocks

    cached = engine(folder, max_num_batched_tokens=12, max_num_seqs=5)
    for i, p in enumerate(ps):
        cached.add_request(str(i), p, greedy())
        assert_same(run(cached)[str(i)], want[i])
    assert cached.block_manager.prefix_hits >= 16  # the shared prefix's full blocks


def test_ngram_speculation_keeps_greedy_output(family) -> None:
    """Guesses verified as a chunk (over the window, on sliding layers) change no token."""
    folder, ref = family
    first = prompts()[1]
    # Most tokens occurred before, and its end did with what followed: guesses follow each step.
    prompt = list(range(3, 200)) + first + reference(ref, [first])[0][0] + first
    want = reference(ref, [prompt])[0]
    eng = engine(folder, speculative="ngram", spec_adaptive=False)
    eng.add_request("r", prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert run(eng)["r"][0] == want[0]  # (requests that ask for logprobs are not speculated on)
    assert eng.spec.num_draft_tokens > 0


def test_engine_serves_the_family_on_the_fused_step(family, tmp_path) -> None:
    """Where the fused step runs (bf16, CPU, blocks of 16, --fused, a compiler), every family gets it
    (test_families_fused.py checks its numbers), and serves."""
    folder, _ = family
    model_dir = shutil.copytree(folder, tmp_path / "model")
    Tokenizer.from_gguf(tiny_bpe_path(tmp_path / "tok.gguf"))._backend.save(str(model_dir / "tokenizer.json"))
    config = EngineConfig(
        model=str(model_dir), dtype="bfloat16", device="cpu", block_size=16, kv_cache_memory=0.01, fused=True
    )
    eng = LLMEngine.from_config(config)
    assert isinstance(eng.model, FusedLlama if fused_supported(eng.model.config) else LlamaModel)
    eng.add_request("r", prompts()[2], greedy())
    assert len(run(eng)["r"][0]) == NEW_TOKENS


def test_window_is_what_transformers_attends(family) -> None:
    """The loaded config names the sliding layers transformers slides on, with the same window."""
    folder, ref = family
    config, _ = load_config_and_weights(folder)
    types = getattr(ref.config, "layer_types", None) or ["full_attention"] * config.num_layers
    window = getattr(ref.config, "sliding_window", None)
    assert [config.is_sliding(i) for i in range(config.num_layers)] == [
        t == "sliding_attention" and window is not None for t in types
    ]
    if any(t == "sliding_attention" for t in types):
        assert config.sliding_window == window


def write_gguf(path: Path, ref, arch: gguf.MODEL_ARCH) -> None:
    """The model as llama.cpp's converter writes it, in F32: gguf's own tensor names, Gemma norms
    stored as 1 + weight, Q/K rows as they are (only Llama's are permuted)."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if arch == gguf.MODEL_ARCH.GEMMA3:
        w.add_sliding_window(WINDOW)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
            data = data + 1.0
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_of_the_family_loads_as_its_folder(family, tmp_path) -> None:
    """A GGUF of the same weights reads back to the same weights and family options (the
    architecture-specific name map, Gemma's norm offset, no Q/K un-permute outside Llama)."""
    folder, ref = family
    arch = {
        "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3,
        "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    }
    path = tmp_path / "model.gguf"
    write_gguf(path, ref, arch[ref.config.model_type])
    config, weights = load_config_and_weights(path)
    want_config, want = load_config_and_weights(folder)
    assert weights.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6, msg=name)
    for option in ("family", "attention_bias", "qk_norm", "norm_plus_one", "sandwich_norms", "embed_scale"):
        assert getattr(config, option) == getattr(want_config, option), option
    assert config.tie_word_embeddings == want_config.tie_word_embeddings
    if config.family == "gemma3":
        assert config.sliding_window == WINDOW
        assert config.sliding_layers == [(i + 1) % 6 != 0 for i in range(config.num_layers)]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gemma3", "text_config": {}}, "multimodal Gemma 3"),
        (
            {**GEMMA, "model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope scaling 'yarn' is not supported",
        ),
        ({**SMALL, "model_type": "phi3"}, "unsupported model_type 'phi3'"),
    ],
)
def test_unsupported_configs_are_clear_errors(tmp_path, config, message) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_config(tmp_path)


def test_gemma_gguf_without_template_chats_in_gemma_turns(tmp_path) -> None:
    """Gemma's turn format (as google/gemma-3's template renders it): the system message opens the
    first user turn, the assistant is "model", and <end_of_turn> ends generation."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "▁", "a"]
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 2, 3, 3, 1, 1])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    tok = Tokenizer.from_gguf(tmp_path / "g.gguf")
    conv = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    ]
    assert tok.apply_chat_template(conv) == (
        "<bos><start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "a"}])
    assert {1, 5} <= set(tok.eos_token_ids)
