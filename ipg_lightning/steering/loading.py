"""A model steered any of the library's ways, ready to generate: the one place that decides how.

The base model; fixed steering (a :class:`~ipg_lightning.steering.selection.ComponentSelection` at
gate value ``gamma``); learned gates (a ``GateSteering`` checkpoint); or an exported checkpoint
directory (its unfolded gates re-applied on load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.checks import check_gamma
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.gates.exported import CARD_FILE
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import IN_MEMORY_MODEL
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.steering.learned import load_steering_checkpoint
from ipg_lightning.steering.selection import ComponentSelection, gates_for_components

#: What is loaded when neither a model path, a report nor a checkpoint names a model.
DEFAULT_MODEL = "tiny:llama"


@dataclass
class SteeredModel:
    """A model, its tokenizer, the gates that steer it (None: unsteered) and a description of how."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    gates: ComponentGates | None
    description: dict[str, Any]


def recorded_model(selection: ComponentSelection | None) -> str:
    """The model a selection's report was computed on; :data:`DEFAULT_MODEL` for a selection by name or none."""
    if selection is None or selection.report is None:
        return DEFAULT_MODEL
    recorded = AttributionReport.load(selection.report).metadata.get("model")
    if not recorded or recorded == IN_MEMORY_MODEL:
        raise ValueError(f"The report {selection.report} does not say which model it was computed on: give the model path")
    return recorded


def load_steered_model(
    model_path: str | None = None,
    dtype: str = "float32",
    selection: ComponentSelection | None = None,
    gamma: float = 1.0,
    steering_checkpoint: str | None = None,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> SteeredModel:
    """Load a model and steer it by a selection at ``gamma``, or by a learned checkpoint.

    Args:
        model_path: the model; default: the one the checkpoint or report was made on.
        dtype: weights dtype.
        selection: components for fixed steering (None: no fixed steering).
        gamma: their gate value.
        steering_checkpoint: learned gates (and adapter) from ``ipg steer``, instead of a selection.
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in.
    """
    if steering_checkpoint is not None:
        if selection is not None:
            raise ValueError("Give either a steering checkpoint (learned gates) or a selection with gamma, not both")
        module = load_steering_checkpoint(steering_checkpoint, model=model_path, allow_other_model=allow_other_model)
        description = {"kind": "learned", "model": module.model_path, "checkpoint": str(steering_checkpoint), "components": module.components}
        return SteeredModel(module.lm, module.tokenizer, module.gates, description)
    model_path = model_path or recorded_model(selection)
    lm, tokenizer = load_model_and_tokenizer(model_path, dtype)
    kind = "exported" if (Path(model_path) / CARD_FILE).is_file() else "base"
    if selection is None:
        return SteeredModel(lm, tokenizer, None, {"kind": kind, "model": model_path})
    selection.attach_saes(lm, architecture)
    components = selection.resolve(lm, model_path, architecture, allow_other_model)
    gates = gates_for_components(lm, components, check_gamma(gamma), architecture)
    description = {
        "kind": "fixed",
        "model": model_path,
        "gamma": gamma,
        "components": components,
        "report": selection.report,
        "k": selection.k,
        "fraction": selection.fraction,
    }
    return SteeredModel(lm, tokenizer, gates, description)
