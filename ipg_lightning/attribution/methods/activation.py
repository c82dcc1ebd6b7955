"""Activation baselines: mean activation magnitude, and the correct-minus-incorrect difference of means.

Both sample N trajectories per prompt like IPG and read each component's mean activation over a
trajectory's generated tokens (:mod:`ipg_lightning.attribution.activations`); neither takes a gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from ipg_lightning.attribution.activations import mean_completion_activations
from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.data import ReasoningBatch


def sampled_activations(method: AttributionMethod, batch: ReasoningBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Sample the batch, and return per-trajectory mean activations by site, the reward matrix and the step's counters."""
    task = method.task
    trajectories = task.sample(batch)
    rewards = task.rewards(batch, trajectories)
    per_row = mean_completion_activations(task.lm, list(task.gates.sites.values()), trajectories, task.hparams.chunk_size)
    return per_row, rewards, task.sample_counts(batch, trajectories, rewards)


class MeanActivation(AttributionMethod):
    """``activation``: the mean absolute activation of each component (averaged over samples, summed over prompts)."""

    name = "activation"

    def step(self, batch: ReasoningBatch) -> None:
        """Sample, record per-trajectory mean activations, and add their magnitudes."""
        per_row, _, counts = sampled_activations(self, batch)
        prompts, samples = len(batch["prompt"]), self.task.sampling.num_samples
        scores = {name: values.abs().view(prompts, samples, -1).mean(1).sum(0) for name, values in per_row.items()}
        self.task.accumulator.update(scores=scores, **counts)


class MeanDifference(AttributionMethod):
    """``mean_diff``: mean activation of trajectories with reward > 0.5 minus that of the others."""

    name = "mean_diff"

    def step(self, batch: ReasoningBatch) -> None:
        """Sample, record per-trajectory mean activations, and sum them by outcome."""
        per_row, rewards, counts = sampled_activations(self, batch)
        correct = rewards.flatten() > 0.5  # with the accuracy reward: correct vs incorrect
        self.task.accumulator.update(
            scores={name: values[correct].sum(0) for name, values in per_row.items()},
            contrast={name: values[~correct].sum(0) for name, values in per_row.items()},
            correct_rows=int(correct.sum()),
            incorrect_rows=int((~correct).sum()),
            **counts,
        )

    def scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mean over the correct trajectories minus mean over the others."""
        correct, incorrect = max(state["correct_rows"], 1.0), max(state["incorrect_rows"], 1.0)
        return {name: (state["score"][name] / correct - state["contrast"][name] / incorrect).float() for name in state["score"]}

    def uninformative_reason(self, state: dict[str, Any]) -> str | None:
        """Every trajectory had the same outcome: there is nothing to contrast."""
        if 0 not in (state["correct_rows"], state["incorrect_rows"]):
            return None
        side = "reward > 0.5" if state["incorrect_rows"] == 0 else "reward <= 0.5"
        return (
            f"mean_diff contrasts trajectories with reward > 0.5 against the others, but all {int(state['trajectories'])} "
            f"had {side}: use problems the model solves sometimes but not always"
        )

    def counts(self, state: dict[str, Any]) -> dict[str, int | None]:
        """How many trajectories had reward > 0.5."""
        return {"zero_signal_prompts": None, "correct_trajectories": int(state["correct_rows"])}
