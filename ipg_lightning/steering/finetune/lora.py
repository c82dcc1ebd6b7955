"""An optional PEFT LoRA adapter trained together with the gates, placed by name or by the selection."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ipg_lightning.model.discovery import is_conv1d, is_projection
from ipg_lightning.steering.finetune.placement import PLACEMENTS, AdapterTargets, Placement


@dataclass(frozen=True)
class LoraSettings:
    """A PEFT LoRA adapter trained together with the gates.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names or suffixes to adapt (e.g. ``[q_proj, v_proj]``), with the
            ``target_modules`` placement.
        placement: where the adapter goes (:mod:`~ipg_lightning.steering.finetune.placement`):
            ``target_modules`` (the names above, in every block), ``localized`` (the projections that
            host the selected components), ``random_layers`` (the same modules in randomly chosen
            other blocks, seeded by the sampling seed: the control) or ``everywhere`` (every
            projection of every block).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    placement: Placement = "target_modules"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"lora.placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0 (the adapter's scale is alpha / r), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def add_lora_adapter(model: nn.Module, settings: LoraSettings, targets: AdapterTargets, seed: int) -> nn.Module:
    """``model`` wrapped in a fresh LoRA adapter on ``targets``, whose initialisation depends on ``seed`` only."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets.modules),
        target_parameters=list(targets.parameters) or None,
        fan_in_fan_out=any(map(is_conv1d, model.modules())),  # GPT-2's Conv1D stores its projections transposed
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def adapted_weights(model: nn.Module) -> dict[str, list[str]]:
    """The projections and fused parameters a PEFT LoRA adapter sits on (paths in the unwrapped model)."""
    prefix = "base_model.model."
    modules = [name.removeprefix(prefix) for name, module in model.named_modules() if hasattr(module, "lora_A") and is_projection(module.base_layer)]
    config = getattr(model, "peft_config", {}).get("default")
    return {"modules": modules, "parameters": list(getattr(config, "target_parameters", None) or [])}
