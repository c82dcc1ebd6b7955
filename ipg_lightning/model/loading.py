"""Load a causal LM and its tokenizer: a local directory, an ``ipg export``, or an alias (``tiny-reasoner``, ``tiny:llama``, ``smollm2``)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

#: Model names that are not directories, each to the function that loads it as ``(model, tokenizer)``
#: given ``(name, dtype)``. Written ``module:function`` and imported only when used (as transformers'
#: auto classes map names), so this ground-floor loader knows of the model zoo without importing it.
#: A key ending in ``:`` is a prefix (``tiny:llama``); any other key is a whole name.
MODEL_ALIASES: dict[str, str] = {
    "smollm2": "ipg_lightning.zoo.smollm2:load_smollm2",
    "tiny:": "ipg_lightning.zoo.tiny:load_tiny",
}
#: Model names that stand for a directory shipped with the package (``module:CONSTANT``). They are
#: resolved before anything loads, so reports, evaluations and checkpoints record the directory, the
#: same as when it is given as a path.
MODEL_DIRECTORIES: dict[str, str] = {
    "tiny-reasoner": "ipg_lightning.zoo.reasoner:TINY_REASONER_PATH",
    "tiny-reasoner-rl": "ipg_lightning.zoo.reasoner:TINY_REASONER_RL_PATH",
}
#: A directory written by ``ipg export`` (one of these files, or this ``config.json`` entry) is read by
#: :data:`EXPORT_READER`, which re-applies the gates that could not fold; other directories load plainly.
EXPORT_CARD_FILE = "steering_card.json"
EXPORT_STEERING_FILE = "steering.safetensors"
#: The steering vectors of an export that could not fold into biases.
EXPORT_VECTORS_FILE = "steering_vectors.safetensors"
#: The files an export carries beside its weights that are not weights (vLLM must not read them as shards).
EXPORT_SIDE_FILES = (EXPORT_STEERING_FILE, EXPORT_VECTORS_FILE)
EXPORT_FILES = (EXPORT_CARD_FILE, *EXPORT_SIDE_FILES)
EXPORT_CONFIG_ENTRY = "ipg_lightning_steering"
EXPORT_READER = "ipg_lightning.gates.exported:load_steered"
#: Files one of which a model directory needs for its tokenizer to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was tried and what to do."""


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name_or_path`` in eval mode with a left-padding tokenizer that has a pad token.

    Args:
        name_or_path: a local Hugging Face model directory, a hub id (only where the hub is
            reachable and the weights are cached), ``tiny-reasoner`` or ``tiny-reasoner-rl`` (the
            shipped reasoners), ``smollm2`` (SmolLM2-135M-Instruct, prepared offline on first use),
            or ``tiny:<family>`` for the tests' random tiny model.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    name_or_path = model_directory(name_or_path)
    alias = next((key for key in MODEL_ALIASES if name_or_path == key or (key.endswith(":") and name_or_path.startswith(key))), None)
    if alias is not None:
        return _imported(MODEL_ALIASES[alias])(name_or_path, dtype)
    _check_tokenizer_files(name_or_path)  # before the weights load
    try:  # an export of this library gets its unfolded gates back; any other directory loads plainly
        load = _imported(EXPORT_READER) if is_export(name_or_path) else AutoModelForCausalLM.from_pretrained
        model = load(name_or_path, dtype=DTYPES[dtype]).eval()
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot load model {name_or_path!r}: {_one_line(error)}.{_offline_hint(name_or_path)}") from None
    return model, load_tokenizer(name_or_path)


def model_directory(name: str) -> str:
    """The directory a name of :data:`MODEL_DIRECTORIES` stands for (``tiny-reasoner``); any other name unchanged."""
    return str(_imported(MODEL_DIRECTORIES[name])) if name in MODEL_DIRECTORIES else name


def is_export(path: str | Path) -> bool:
    """True if ``path`` is a directory written by ``ipg export`` (its gates may need re-applying)."""
    path = Path(path)
    if any((path / name).is_file() for name in EXPORT_FILES):
        return True
    try:
        return bool(json.loads((path / "config.json").read_text(encoding="utf-8")).get(EXPORT_CONFIG_ENTRY))
    except (OSError, ValueError, AttributeError):
        return False


def _imported(reference: str) -> Any:
    """The object (a function, a constant) a ``module:name`` reference names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_tokenizer_files(name_or_path: str) -> None:
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path} is not a Hugging Face model directory: it has no config.json")
    if Path(name_or_path).is_dir() and not any((Path(name_or_path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{name_or_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the model it was made from into it"
        )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def _offline_hint(name_or_path: str) -> str:
    if Path(name_or_path).is_dir():
        return ""
    return (
        " It is not a local directory, and without hub access only local copies load: download the "
        "weights on a connected machine and point `model_path` at that directory."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory, set to left padding with a pad token."""
    _check_tokenizer_files(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot load the tokenizer of {name_or_path!r}: {error}.{_offline_hint(name_or_path)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
