"""Load a causal LM and its tokenizer from a local directory (or the tests' tiny model)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ipg_lightning.testing import TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was tried and what to do."""


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name_or_path`` in eval mode with a left-padding tokenizer that has a pad token.

    Args:
        name_or_path: a local Hugging Face model directory, a hub id (only where the hub is
            reachable and the weights are cached), or ``tiny:<family>`` for the tests' random
            tiny model (``tiny:llama``, ``tiny:qwen2``, ...).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if name_or_path.startswith(TINY_PREFIX):
        family = name_or_path[len(TINY_PREFIX) :]
        if family not in TINY_FAMILIES:
            raise ModelLoadError(f"No tiny model {name_or_path!r}; choose from {[TINY_PREFIX + f for f in TINY_FAMILIES]}")
        return tiny_causal_lm(family), tiny_tokenizer()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot load model {name_or_path!r}: {error}.{_offline_hint(name_or_path)}") from None
    return model.eval(), load_tokenizer(name_or_path)


def _offline_hint(name_or_path: str) -> str:
    if Path(name_or_path).is_dir():
        return ""
    return (" It is not a local directory, and without hub access only local copies load: download the "
            "weights on a connected machine and point `model` at that directory.")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory, set to left padding with a pad token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot load the tokenizer of {name_or_path!r}: {error}.{_offline_hint(name_or_path)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
