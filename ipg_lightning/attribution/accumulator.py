"""DDP-reducible sums of per-site scores and counters over an attribution run."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

#: Scalar counters every attribution run keeps (each method updates the ones it needs).
COUNTERS = (
    "prompts",
    "signal_prompts",
    "trajectories",
    "tokens",
    "reward_sum",
    "score_sum",
    "surrogate_delta",
    "above_rows",
    "below_rows",
    "redrawn_groups",
    "redrawn_tokens",
)


class AttributionAccumulator(Metric):
    """Sums of per-prompt scores and counters; every state reduces by ``sum`` across processes."""

    full_state_update = False

    def __init__(self, site_sizes: dict[str, int]) -> None:
        super().__init__()
        self.keys = {name: name.replace(".", "__") for name in site_sizes}
        for name, size in site_sizes.items():
            for prefix in ("score", "contrast"):
                self.add_state(f"{prefix}__{self.keys[name]}", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        for counter in COUNTERS:
            self.add_state(counter, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: dict[str, torch.Tensor] | None = None, contrast: dict[str, torch.Tensor] | None = None, **counts: float) -> None:
        """Add per-site score sums (and the second, ``contrast`` sums of difference-of-means) and counters."""
        for prefix, values in (("score", scores or {}), ("contrast", contrast or {})):
            for name, vector in values.items():
                state = getattr(self, f"{prefix}__{self.keys[name]}")
                state += vector.to(state.device, torch.float64)
        for counter, value in counts.items():
            state = getattr(self, counter)
            state += float(value)

    def compute(self) -> dict[str, Any]:
        """Score sums per site (and contrast sums) plus counters, as plain values."""
        return {
            "score": {name: getattr(self, f"score__{key}").clone() for name, key in self.keys.items()},
            "contrast": {name: getattr(self, f"contrast__{key}").clone() for name, key in self.keys.items()},
            **{counter: getattr(self, counter).item() for counter in COUNTERS},
        }
