"""Steering: choose components, set or learn their gates, and export the steered model.

- :mod:`~ipg_lightning.steering.selection`: :class:`ComponentSelection` (top of a report, or names)
  and :func:`gates_for_components` (fixed steering);
- :mod:`~ipg_lightning.steering.learned`: :class:`GateSteering`, the LightningModule that learns
  gates (optionally with LoRA), and :func:`load_steering_checkpoint`;
- :mod:`~ipg_lightning.steering.objectives`: one loss function per training objective;
- :mod:`~ipg_lightning.steering.checkpoint`: reading steering checkpoints without running code;
- :mod:`~ipg_lightning.steering.loading`: :func:`load_steered_model`, a model steered by any of these;
- :mod:`~ipg_lightning.steering.sweep`: fixed steering swept over gate values and top-k, or vectors over their strength;
- :mod:`~ipg_lightning.steering.vector_sources`: steering vectors from reward contrasts of the model's trajectories, or SAE directions;
- :mod:`~ipg_lightning.steering.export`: folding into a plain Hugging Face checkpoint.
"""

from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.steering.finetune.lora import LoraSettings
from ipg_lightning.steering.learned import GateSteering, load_steering_checkpoint
from ipg_lightning.steering.selection import ComponentSelection, gates_for_components

__all__ = ["ComponentSelection", "GateSteering", "LoraSettings", "export_steered_model", "gates_for_components", "load_steering_checkpoint"]
