"""What learned steering trains besides the gates: a LoRA adapter placed from the selection, or weight slices.

:class:`FineTune` is the one place that adds either to a model, says where it sits (for logs,
checkpoints and export cards), and refuses a checkpoint whose fine-tune sits elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.steering.checkpoint import SteeringCheckpointError
from ipg_lightning.steering.finetune.lora import LoraSettings, adapted_weights, add_lora_adapter
from ipg_lightning.steering.finetune.placement import AdapterTargets, adapter_targets
from ipg_lightning.steering.finetune.slices import SliceDelta, WeightSlice, attach_weight_slices, component_slices


@dataclass
class FineTune:
    """Where the fine-tune of a steered model sits.

    Args:
        adapter: the weights a LoRA adapter wraps (full paths), or None without one.
        slices: the trained weight slices (empty without them).
    """

    adapter: AdapterTargets | None = None
    slices: list[WeightSlice] = field(default_factory=list)

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        components: list[str],
        lora: LoraSettings | None,
        weight_slices: bool,
        seed: int,
        architecture: ArchitectureSpec | None = None,
    ) -> tuple[nn.Module, FineTune]:
        """Add the adapter (wrapping ``model``) or the weight slices of ``components``; return the model and where they sit."""
        fine_tune = cls()
        if lora is not None:
            targets = adapter_targets(model, lora.placement, lora.target_modules, components, seed, architecture)
            model = add_lora_adapter(model, lora, targets, seed).eval()
            fine_tune.adapter = AdapterTargets(**{key: tuple(paths) for key, paths in adapted_weights(model).items()})
            rank_zero_info(f"LoRA ({lora.placement}) on {len(fine_tune.adapter.paths)} weights: {', '.join(fine_tune.adapter.paths)}")
        if weight_slices:
            fine_tune.slices = component_slices(model, components, architecture)
            attach_weight_slices(model, fine_tune.slices)
            rank_zero_info(f"training weight slices of {', '.join(fine_tune.sliced_modules())}")
        return model, fine_tune

    def sliced_modules(self) -> list[str]:
        """The projections whose weight slices train, each once."""
        return list(dict.fromkeys(piece.module for piece in self.slices))

    def record(self) -> dict[str, Any]:
        """Where it sits, as saved in checkpoints: the adapter's weights and the trained slices."""
        return {"adapter_targets": self.adapter.as_dict() if self.adapter else None, "weight_slices": [asdict(piece) for piece in self.slices]}

    def check_matches(self, steering: dict[str, Any], what: str) -> None:
        """Refuse a checkpoint (its steering entry) whose adapter or slices sit elsewhere (other settings or seed)."""
        for key, own in self.record().items():
            if key in steering and steering[key] != own:
                raise SteeringCheckpointError(
                    f"{what} trained {key} {steering[key]}, but this run builds {own}: resume and load with the placement, "
                    "seed and selection it was trained with"
                )


def keep_deltas_float32(model: nn.Module) -> None:
    """Weight-slice deltas stay float32 whatever the Trainer's precision (like the gates)."""
    for module in model.modules():
        if isinstance(module, SliceDelta):
            module.float()
