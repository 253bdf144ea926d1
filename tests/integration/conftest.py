"""The real default model, loaded once per session (make test fetches it first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailserve.models.llama import LlamaModel
from tailserve.models.loader import load_config_and_weights, resolve_model


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def default_model_fp32(default_model_path: Path) -> LlamaModel:
    config, weights = load_config_and_weights(default_model_path)
    return LlamaModel(config, weights, torch.float32).eval()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return resolve_model("gemma3-270m")
