"""Activation baselines: mean activation magnitude, and the difference of means above and below each prompt's mean reward.

Both sample N trajectories per prompt like IPG and read each component's mean activation over a
trajectory's generated tokens (:mod:`ipg_lightning.attribution.activations`); neither takes a gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from ipg_lightning.attribution.activations import mean_completion_activations
from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.data import ReasoningBatch
from ipg_lightning.rewards.completions import sides_of_the_mean


def sampled_activations(method: AttributionMethod, batch: ReasoningBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Sample the batch, and return per-trajectory mean activations by site, the reward matrix and the step's counters."""
    task = method.task
    trajectories = task.sample(batch)
    rewards = task.rewards(batch, trajectories)
    task.keep(batch, trajectories, rewards)
    per_row = mean_completion_activations(task.lm, list(task.gates.sites.values()), trajectories, task.settings.chunk_size)
    return per_row, rewards, task.sample_counts(batch, trajectories, rewards)


class MeanActivation(AttributionMethod):
    """``activation``: the mean absolute activation of each component (averaged over samples, summed over prompts)."""

    name = "activation"
    samples = True

    def step(self, batch: ReasoningBatch) -> None:
        """Sample, record per-trajectory mean activations, and add their magnitudes."""
        per_row, _, counts = sampled_activations(self, batch)
        prompts, samples = len(batch["prompt"]), self.task.sampling.num_samples
        scores = {name: values.abs().view(prompts, samples, -1).mean(1).sum(0) for name, values in per_row.items()}
        self.task.accumulator.update(scores=scores, **counts)


class MeanDifference(AttributionMethod):
    """``mean_diff``: mean activation of trajectories that beat their prompt's mean reward minus that of those below it.

    The contrast is within each prompt's N samples, so it works for any reward and does not confound
    the behaviour with the problem: for accuracy it is correct against incorrect on the prompts the
    model solves sometimes; for reasoning length it is long against short answers to the same question.
    Prompts whose N rewards are all equal contribute to neither side.
    """

    name = "mean_diff"
    samples = True

    def step(self, batch: ReasoningBatch) -> None:
        """Sample, record per-trajectory mean activations, and sum them by side of their prompt's mean reward."""
        per_row, rewards, counts = sampled_activations(self, batch)
        above, below, has_signal = sides_of_the_mean(rewards)
        self.task.accumulator.update(
            scores={name: values[above].sum(0) for name, values in per_row.items()},
            contrast={name: values[below].sum(0) for name, values in per_row.items()},
            above_rows=int(above.sum()),
            below_rows=int(below.sum()),
            signal_prompts=int(has_signal.sum()),
            **counts,
        )

    def scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mean over the trajectories above their prompt's mean reward minus mean over those below."""
        above, below = max(state["above_rows"], 1.0), max(state["below_rows"], 1.0)
        return {name: (state["score"][name] / above - state["contrast"][name] / below).float() for name in state["score"]}

    def uninformative_reason(self, state: dict[str, Any]) -> str | None:
        """No prompt's rewards differed: there is nothing to contrast."""
        if state["above_rows"] and state["below_rows"]:
            return None
        return (
            f"mean_diff contrasts each prompt's trajectories above and below its mean reward, but the rewards of all "
            f"{int(state['prompts'])} prompts were equal: use problems the model solves sometimes but not always"
        )

    def counts(self, state: dict[str, Any]) -> dict[str, int | None]:
        """How many prompts had differing rewards, and how many trajectories beat their prompt's mean."""
        return {"zero_signal_prompts": int(state["prompts"] - state["signal_prompts"]), "above_mean_trajectories": int(state["above_rows"])}
