"""``random``: seeded Gaussian scores, the floor every other method must beat."""

from __future__ import annotations

from typing import Any

import torch

from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.data import ReasoningBatch


class RandomScores(AttributionMethod):
    """Standard-normal scores drawn from the sampling seed; the model is never run."""

    name = "random"

    def step(self, batch: ReasoningBatch) -> None:
        """Count the prompts (so reports of every method have the same counts)."""
        self.task.accumulator.update(prompts=len(batch["prompt"]))

    def scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One seeded draw per site, in site order."""
        generator = torch.Generator().manual_seed(self.task.sampling.seed)
        return {name: torch.randn(site.size, generator=generator) for name, site in self.task.gates.sites.items()}
