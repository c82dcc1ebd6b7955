"""An optional PEFT LoRA adapter trained together with the gates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


@dataclass(frozen=True)
class LoraSettings:
    """A PEFT LoRA adapter trained together with the gates.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names or suffixes to adapt (e.g. ``[q_proj, v_proj]``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def add_lora_adapter(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """``model`` wrapped in a fresh LoRA adapter whose initialisation depends on ``seed`` only."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)
