"""Steering vectors learned with the Lightning Trainer (``ipg steer --model.vectors.layers '[L]'``), beside or instead of gates.

The vectors start at zero (the unsteered model) and train with the same objectives as gates (policy
gradient on any reward, or supervised); ``max_norm`` bounds each vector's norm, projected after every
optimizer step, so a run cannot buy its reward with an arbitrarily large push.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.sites import default_layer
from ipg_lightning.vectors.additive import VECTOR_FAMILIES, SteeringVectors


@dataclass(frozen=True)
class VectorTraining:
    """Which steering vectors ``GateSteering`` learns, and how large they may grow.

    Args:
        families: the sites' families (``resid_post``, ``attn_out``, ``mlp_out``).
        layers: the blocks; default the block at 3/4 depth (as attribution).
        max_norm: the largest L2 norm a vector may reach (None: unbounded); after each step a longer one is scaled back to it.
    """

    families: list[str] = field(default_factory=lambda: ["resid_post"])
    layers: list[int] | None = None
    max_norm: float | None = None

    def __post_init__(self) -> None:
        wrong = [family for family in self.families if family not in VECTOR_FAMILIES]
        if wrong or not self.families:
            raise ValueError(f"vectors.families must name sites among {list(VECTOR_FAMILIES)}, got {self.families}")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"vectors.max_norm must be a positive number (or None: unbounded), got {self.max_norm}")

    def build(self, model: nn.Module, architecture: ArchitectureSpec | None = None) -> SteeringVectors:
        """Zero vectors (the unsteered model) at these sites of ``model``, trainable, with a provenance that says they were learned."""
        layers = [default_layer(model, architecture)] if self.layers is None else self.layers
        provenance = {"source": "learned", "max_norm": self.max_norm}
        return SteeringVectors.for_model(model, self.families, layers, architecture, provenance=provenance)
