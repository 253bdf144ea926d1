"""The fused C++ step on the real model: its next-token distributions stay close to the fp32 reference
(itself token-exact against transformers), and its greedy output is the same alone, batched and chunked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.layers.attention import AttentionMetadata, PrefillChunk
from tailserve.models.fused import FusedLlama, fused_supported
from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config_and_weights
from tailserve.sampling import SamplingParams
from tailserve.tokenizer import Tokenizer
from tests.tiny import run_all

pytestmark = pytest.mark.model

TEXTS = [
    "The three laws of robotics are a set of rules devised by the science fiction author Isaac Asimov.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Paris is the capital and most populous city of France. Situated on the Seine River, in the north "
    "of the country, it is at the heart of the Île-de-France region. " * 6,
]
BLOCK = 16


@pytest.fixture(scope="module")
def loaded(default_model_path: Path):
    config, weights = load_config_and_weights(default_model_path)
    if not fused_supported(config):
        pytest.skip("the fused step needs a C++ compiler")
    return config, weights, Tokenizer.load(default_model_path)


@pytest.fixture(scope="module", params=["none", "int8", "int4"])
def fused(request, loaded) -> FusedLlama:
    config, weights, _ = loaded
    return FusedLlama.pack(config, weights, request.param)


def reference_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """fp32 logits of every position of one sequence, prefilled at once."""
    c, t = model.config, len(ids)
    kv = [
        (torch.zeros(t, c.num_kv_heads, c.head_dim), torch.zeros(t, c.num_kv_heads, c.head_dim))
        for _ in model.layers
    ]
    meta = AttentionMetadata(slot_mapping=torch.arange(t), prefills=[PrefillChunk(0, t, t, None, None)])
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(t), kv, meta))


def fused_logits(model: FusedLlama, ids: list[int]) -> torch.Tensor:
    c, t = model.config, len(ids)
    nblk = -(-t // BLOCK)
    shape = model.kv_cache_shape(nblk, BLOCK)
    k = [np.zeros(shape, np.uint16) for _ in range(c.num_layers)]
    v = [np.zeros(shape, np.uint16) for _ in range(c.num_layers)]
    return torch.from_numpy(
        model.compute_logits(ids, [[0, t]], np.arange(nblk)[None], BLOCK, np.arange(t), k, v)
    )


@pytest.fixture(scope="module")
def int4_draft(loaded) -> FusedLlama:
    config, weights, _ = loaded
    return FusedLlama.pack(config, weights, "int4", draft_head=True)


def test_next_token_distributions_match_fp32(
    fused: FusedLlama, default_model_fp32: LlamaModel, loaded, cpu_tier: str
) -> None:
    fused = fused.on_tier(cpu_tier)
    tok = loaded[2]
    kls, agree, n = [], 0, 0
    for text in TEXTS:
        ids = tok.encode(text)
        ref = reference_logits(default_model_fp32, ids).log_softmax(-1)
        got = fused_logits(fused, ids).log_softmax(-1)
        kls.append((ref.exp() * (ref - got)).sum(-1).mean().item())
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        n += len(ids)
    print(f"{cpu_tier}: mean KL {sum(kls) / len(kls):.5f}, top-1 agreement {agree / n:.3f}")
    assert max(kls) < 0.01  # measured: 0.0002 (bf16), 0.004 (int8), 0.003 (int4)
    assert agree / n > 0.95


def test_greedy_same_alone_batched_and_chunked(loaded, int4_draft: FusedLlama, cpu_tier: str) -> None:
    tok = loaded[2]
    model = int4_draft.on_tier(cpu_tier)
    prompts = [tok.encode(t) for t in TEXTS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def engine(**options) -> LLMEngine:
        return LLMEngine(EngineConfig(kv_cache_memory=0.1, prefix_cache=False, **options), model, tok)

    alone = []
    for p in prompts:
        eng = engine()
        eng.add_request("r", p, params)
        alone.append(run_all(eng)["r"])
    eng = engine(max_num_batched_tokens=37, max_num_seqs=3)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    got = run_all(eng)
    assert [got[str(i)] for i in range(len(prompts))] == alone


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_greedy_identical_with_speculation(
    loaded, int4_draft: FusedLlama, speculative: str, cpu_tier: str
) -> None:
    """A prompt the output quotes (n-gram guesses land) and plain prompts, batched, with the prefix
    cache: every token equals plain decoding's."""
    tok = loaded[2]
    model = int4_draft.on_tier(cpu_tier)
    quote = "Repeat this text exactly:\n\n" + TEXTS[0] + " " + TEXTS[1]
    prompts = [tok.encode(t) for t in [quote, *TEXTS]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    def run(**options) -> tuple[list[list[int]], LLMEngine]:
        eng = LLMEngine(EngineConfig(kv_cache_memory=0.1, **options), model, tok)
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        got = run_all(eng)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        return [got[str(i)] for i in range(len(prompts))], eng

    plain, _ = run()
    spec, eng = run(speculative=speculative, spec_adaptive=False, max_num_seqs=2)
    assert spec == plain
    assert eng.stats.spec_decode_num_draft_tokens > 0
    if speculative == "ngram":
        assert eng.stats.spec_decode_num_accepted_tokens > 10


def test_separate_draft_model_loaded_by_name(loaded, default_model_path: Path) -> None:
    """`--draft-model NAME` loads a second model (here the target's own checkpoint, so it must guess
    every token right), checks its tokenizer, gives it a KV pool, and the output stays plain decoding's."""
    _, _, tok = loaded
    eng = LLMEngine.from_config(
        EngineConfig(
            model=str(default_model_path),
            speculative="draft",
            draft_model="smollm2-135m-instruct",
            spec_adaptive=False,
            kv_cache_memory=0.1,
        )
    )
    plain = LLMEngine(EngineConfig(kv_cache_memory=0.1), eng.model, tok)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for e in (eng, plain):
        for i, t in enumerate(TEXTS):
            e.add_request(str(i), tok.encode(t), params)
    assert run_all(eng) == run_all(plain)
    drafted = eng.stats.spec_decode_num_draft_tokens
    assert drafted > 0 and eng.stats.spec_decode_num_accepted_tokens == drafted


def test_logits_of_a_few_rows_equal_those_of_all_rows(fused: FusedLlama, loaded, cpu_tier: str) -> None:
    """The last layer runs its attention and MLP only on the rows whose logits are asked for: those
    rows' logits must be bitwise what a pass computing every row gives, full depth or a draft's."""
    fused = fused.on_tier(cpu_tier)
    _, _, tok = loaded
    a, b = tok.encode(TEXTS[0]), tok.encode(TEXTS[1])
    c, nblk = fused.config, 8
    shape = fused.kv_cache_shape(2 * nblk, BLOCK)
    ids = torch.tensor(a + b)
    seqs = torch.tensor([[0, len(a)], [0, len(b)]])
    tables = torch.arange(2 * nblk).reshape(2, nblk)
    few = torch.tensor([3, len(a) - 1, len(a) + len(b) - 1])
    for depth in (None, c.num_layers // 2):
        k = [np.zeros(shape, np.uint16) for _ in range(c.num_layers)]
        v = [np.zeros(shape, np.uint16) for _ in range(c.num_layers)]
        every = fused.compute_logits(ids, seqs, tables, BLOCK, np.arange(len(ids)), k, v, depth)
        some = fused.compute_logits(ids, seqs, tables, BLOCK, few, k, v, depth)
        assert np.array_equal(some, every[few.numpy()])
