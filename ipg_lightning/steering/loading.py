"""A model steered any of the library's ways, ready to generate: the one place that decides how.

A :class:`SteeringSource` says what steers: nothing (the base model, or an exported checkpoint
directory whose unfolded gates are re-applied on load); fixed steering (a
:class:`~ipg_lightning.steering.selection.ComponentSelection` at gate value ``gamma``); or learned
gates (a ``GateSteering`` checkpoint, with the vectors it learned, if any); and, with any of those,
additive steering vectors (a vector file, :mod:`ipg_lightning.vectors`). :func:`load_steered_model` loads the model steered by it, with
a :class:`SteeringDescription` of what was steered: the record that ``metrics.json``, export cards
and explorer pages carry.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.checks import check_gamma
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.gates.exported import CARD_FILE
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import IN_MEMORY_MODEL
from ipg_lightning.model.loading import load_model_and_tokenizer, model_directory
from ipg_lightning.steering.learned import load_steering_checkpoint
from ipg_lightning.steering.selection import ComponentSelection, gates_for_components
from ipg_lightning.vectors import SteeringVectors, load_vectors
from ipg_lightning.vectors.files import read_vector_metadata

#: What is loaded when neither a model path, a report nor a checkpoint names a model.
DEFAULT_MODEL = "tiny:llama"


#: How a model is steered: ``base`` (not at all), ``exported`` (an ``ipg export`` directory), ``fixed``
#: (a selection at a gamma), ``learned`` (gates trained by ``ipg steer`` or the demo) or ``vectors``
#: (steering vectors alone; with gates, the gates' kind and the vector file are both recorded).
SteeringKind = Literal["base", "exported", "fixed", "learned", "vectors"]


@dataclass(frozen=True)
class SteeringSource:
    """What steers a model: nothing, a selection of components at ``gamma``, or learned gates.

    Args:
        selection: components for fixed steering: the top of a report (``report`` with ``k`` or
            ``fraction``, ``signed``, ``per_layer``, ``family``) or names (``components``).
        gamma: the selected components' gate value.
        checkpoint: learned gates (and adapter or weight slices) from ``ipg steer``, instead of a selection.
        vectors: a steering-vector file (``ipg vectors``) whose vectors are added as well, after any gates.
        alpha: the vectors' strength, instead of the one their file holds.
    """

    selection: ComponentSelection | None = None
    gamma: float = 1.0
    checkpoint: str | None = None
    vectors: str | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        check_gamma(self.gamma)
        if self.checkpoint is not None and self.selection is not None:
            raise ValueError("Give either a steering checkpoint (learned gates) or a selection with gamma, not both")
        if self.selection is not None:
            self.selection.check_count()
        if self.alpha is not None and self.vectors is None:
            raise ValueError("alpha is the strength of steering vectors: give the vector file too (--vectors FILE)")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")
        if self.vectors is not None:
            read_vector_metadata(self.vectors)  # a missing or damaged file is refused before any model loads

    @property
    def steers(self) -> bool:
        """True if it steers anything (a selection, a checkpoint or vectors)."""
        return self.selection is not None or self.checkpoint is not None or self.vectors is not None


@dataclass(frozen=True)
class SteeringDescription:
    """What steered a model, as ``metrics.json``, export cards and explorer pages record it.

    Args:
        kind: how it was steered (:data:`SteeringKind`).
        model: the model's path or alias.
        components: the steered components (fixed or learned steering).
        gamma: their gate value (fixed steering; learned gates have one value each).
        checkpoint: the steering checkpoint the learned gates came from.
        report: the report a fixed selection was taken from, with its ``k`` or ``fraction``.
        k: how many top components were selected.
        fraction: or what share of them.
        reward: what learned gates were trained on, where the trainer records it.
        vectors: the steering-vector file whose vectors were added.
        alpha: their strength.
    """

    kind: SteeringKind
    model: str
    components: list[str] | None = None
    gamma: float | None = None
    checkpoint: str | None = None
    report: str | None = None
    k: int | None = None
    fraction: float | None = None
    reward: str | None = None
    vectors: str | None = None
    alpha: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; unset entries are left out."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SteeringDescription:
        """Read what :meth:`to_json` wrote; unknown entries raise ``TypeError``, an unknown kind ``ValueError``."""
        description = cls(**payload)
        if description.kind not in typing.get_args(SteeringKind):
            raise ValueError(f"steering kind {description.kind!r} is none of {typing.get_args(SteeringKind)}")
        return description


@dataclass
class SteeredModel:
    """A model, its tokenizer, the gates and vectors that steer it (None: not steered that way) and a description of how."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    gates: ComponentGates | None
    description: SteeringDescription
    vectors: SteeringVectors | None = None

    def to(self, device: torch.device | str) -> SteeredModel:
        """Move the model, its gates and its vectors to ``device`` (in place); returns itself."""
        self.model.to(device)
        for steering in (self.gates, self.vectors):
            if steering is not None:
                steering.to(device)
        return self


def recorded_model(selection: ComponentSelection | None) -> str:
    """The model a selection's report was computed on; :data:`DEFAULT_MODEL` for a selection by name or none."""
    if selection is None or selection.report is None:
        return DEFAULT_MODEL
    recorded = AttributionReport.load(selection.report).metadata.model
    if not recorded or recorded == IN_MEMORY_MODEL:
        raise ValueError(f"The report {selection.report} does not say which model it was computed on: give the model path")
    return recorded


def load_steered_model(
    model_path: str | None = None,
    dtype: str = "float32",
    source: SteeringSource = SteeringSource(),
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> SteeredModel:
    """Load a model and steer it as ``source`` says.

    Args:
        model_path: the model; default: the one the checkpoint, report or vectors were made on.
        dtype: weights dtype.
        source: what steers it (default: nothing).
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in.
    """
    if model_path is None and source.vectors is not None and source.selection is None and source.checkpoint is None:
        model_path = read_vector_metadata(source.vectors)["model"]["name"]  # the model the vectors were built on
    steered = _load_gated_model(model_path, dtype, source, allow_other_model, architecture)
    if source.vectors is None:
        return steered
    if steered.vectors is not None:
        raise ValueError(f"{source.checkpoint} carries learned steering vectors already; add a vector file (--vectors) to a checkpoint without them")
    vectors = load_vectors(source.vectors, steered.model, steered.description.model, allow_other_model, architecture)
    if source.alpha is not None:
        vectors.alpha = source.alpha
    kind = "vectors" if steered.description.kind == "base" else steered.description.kind
    steered.description = replace(steered.description, kind=kind, vectors=str(source.vectors), alpha=vectors.alpha)
    steered.vectors = vectors
    return steered


def _load_gated_model(
    model_path: str | None, dtype: str, source: SteeringSource, allow_other_model: bool, architecture: ArchitectureSpec | None
) -> SteeredModel:
    """The model with the gates of ``source`` (a checkpoint's, a selection's, or none)."""
    if source.checkpoint is not None:
        module = load_steering_checkpoint(source.checkpoint, model=model_path, allow_other_model=allow_other_model)
        learned_vectors = {"vectors": str(source.checkpoint), "alpha": module.vectors.alpha} if module.vectors is not None else {}
        description = SteeringDescription(
            "learned", module.model_path, components=list(module.components), checkpoint=str(source.checkpoint), **learned_vectors
        )
        return SteeredModel(module.lm, module.tokenizer, module.gates, description, module.vectors)
    selection = source.selection
    model_path = model_directory(model_path or recorded_model(selection))
    lm, tokenizer = load_model_and_tokenizer(model_path, dtype)
    if selection is None:
        kind = "exported" if (Path(model_path) / CARD_FILE).is_file() else "base"
        return SteeredModel(lm, tokenizer, None, SteeringDescription(kind, model_path))
    selection.attach_saes(lm, architecture)
    components = selection.resolve(lm, model_path, architecture, allow_other_model)
    gates = gates_for_components(lm, components, source.gamma, architecture)
    description = SteeringDescription(
        "fixed", model_path, components=components, gamma=source.gamma, report=selection.report, k=selection.k, fraction=selection.fraction
    )
    return SteeredModel(lm, tokenizer, gates, description)
