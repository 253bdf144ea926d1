"""Greedy output equals Hugging Face transformers' token for token, on the same dequantized weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailserve.config import EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.models.llama import LlamaModel
from tailserve.sampling import SamplingParams
from tests.tiny import run_all

pytestmark = pytest.mark.model

TOPICS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is and when to use one.",
    "List three tips for writing clear Python code, with a short example for each.",
]
NEW_TOKENS = 32


def chat_prompts(tokenizer) -> list[list[int]]:
    """8 chat prompts of about 10 to 600 tokens."""
    filler = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report. "
    convs = [[{"role": "user", "content": t}] for t in TOPICS]
    convs.append([{"role": "system", "content": "You are terse."}, {"role": "user", "content": TOPICS[1]}])
    convs.append([{"role": "user", "content": filler * 12 + "Summarise the text above."}])
    convs.append([{"role": "user", "content": filler * 29 + "What animal jumps?"}])
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in convs]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    lengths = sorted(len(x) for x in ids)
    assert lengths[0] <= 30 and 500 <= lengths[-1] <= 650, lengths
    return ids


@pytest.fixture(scope="module")
def reference(default_model_path: Path) -> tuple[list[list[int]], list[list[int]]]:
    transformers = pytest.importorskip("transformers")
    d, name = str(default_model_path.parent), default_model_path.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    prompts = chat_prompts(tok)
    return prompts, reference_continuations(ref, prompts)


def reference_continuations(ref, prompts: list[list[int]]) -> list[list[int]]:
    """A transformers model's greedy continuations of each prompt, alone, NEW_TOKENS each."""
    outs = []
    with torch.inference_mode():
        for p in prompts:
            gen = ref.generate(
                torch.tensor([p]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def engine(model: LlamaModel, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(kv_cache_memory=0.25, **options), model)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def test_one_at_a_time_matches_transformers(default_model_fp32: LlamaModel, reference) -> None:
    prompts, expected = reference
    eng = engine(default_model_fp32, prefix_cache=False)
    for p, want in zip(prompts, expected):
        eng.add_request("r", p, greedy())
        assert run_all(eng)["r"] == want


def test_all_together_chunked_matches_transformers(default_model_fp32: LlamaModel, reference) -> None:
    prompts, expected = reference
    chunk = 128
    assert chunk < max(len(p) for p in prompts)
    eng = engine(default_model_fp32, max_num_batched_tokens=chunk, max_num_seqs=8)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy())
    got = run_all(eng)
    assert [got[str(i)] for i in range(len(prompts))] == expected
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
