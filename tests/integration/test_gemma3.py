"""Gemma 3 270M (Q4_K_M GGUF, dequantized to fp32): greedy output equals transformers' token for token,
on 8 chat prompts in Gemma's turn format, the longest beyond the 512-token sliding window.

(Both models get the same prompt ids, from our tokenizer. That it tokenizes these prompts as
transformers' GGUF tokenizer does was checked when this was written; building that tokenizer takes
~40 s here, so it is not repeated in the suite.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config_and_weights
from tailserve.tokenizer import Tokenizer
from tests.integration.test_exactness import TOPICS, engine, greedy, reference_continuations
from tests.tiny import run_all

pytestmark = pytest.mark.model


def chat_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """8 chat prompts of about 10 to 650 tokens, with our template (the GGUF carries none)."""
    filler = "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report. "
    convs = [[{"role": "user", "content": t}] for t in TOPICS]
    convs.append([{"role": "system", "content": "You are terse."}, {"role": "user", "content": TOPICS[1]}])
    convs.append([{"role": "user", "content": filler * 12 + "Summarise the text above."}])
    convs.append([{"role": "user", "content": filler * 34 + "What animal jumps?"}])
    return [tokenizer.encode(tokenizer.apply_chat_template(c)) for c in convs]


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> tuple[LlamaModel, list[list[int]], list[list[int]]]:
    """Our fp32 model, the prompts, and transformers' greedy continuations (its own GGUF loader)."""
    transformers = pytest.importorskip("transformers")
    config, weights = load_config_and_weights(gemma3_path)
    model = LlamaModel(config, weights, torch.float32).eval()
    del weights
    prompts = chat_prompts(Tokenizer.load(gemma3_path))
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] <= 30 and config.sliding_window < lengths[-1] <= 700, lengths
    d, name = str(gemma3_path.parent), gemma3_path.name
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, prompts, reference_continuations(ref, prompts)


def test_one_at_a_time_matches_transformers(gemma3) -> None:
    model, prompts, expected = gemma3
    eng = engine(model, prefix_cache=False)
    for p, want in zip(prompts, expected):
        eng.add_request("r", p, greedy())
        assert run_all(eng)["r"] == want


def test_all_together_chunked_matches_transformers(gemma3) -> None:
    model, prompts, expected = gemma3
    chunk = 128
    assert chunk < max(len(p) for p in prompts)
    eng = engine(model, max_num_batched_tokens=chunk, max_num_seqs=8)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy())
    got = run_all(eng)
    assert [got[str(i)] for i in range(len(prompts))] == expected
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
