"""Shared test setup (tests and doctests): no hub access ever, and small deterministic fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ipg_lightning.testing import tiny_causal_lm, tiny_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer():
    """The character-level tiny tokenizer (deterministic, no chat template)."""
    return tiny_tokenizer()


@pytest.fixture
def tiny_model():
    """A factory ``make(family="llama", seed=0, **config_overrides)`` of fresh tiny causal LMs.

    Each call builds a new model (tests fold gates into weights and otherwise mutate them). Building
    forks the RNG, so a call does not disturb the test's own random stream wherever it happens.
    """

    def make(family: str = "llama", seed: int = 0, **overrides):
        return tiny_causal_lm(family, seed=seed, **overrides)

    return make


@pytest.fixture
def tiny_llama(tiny_model):
    """A fresh ``tiny_causal_lm("llama")`` (seed 0) for each test."""
    return tiny_model("llama")
