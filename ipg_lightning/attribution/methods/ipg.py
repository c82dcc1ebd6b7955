"""Integrated Policy Gradient, and its one-point special case ``grad_x_act``.

Sample N trajectories per prompt with the gates at 1, score them, take group advantages, then
integrate the policy-gradient surrogate along the gate path (``docs/method.md`` section 3): over
the same trajectories at every quadrature point (``estimation: fixed``, exactly Integrated
Gradients of the surrogate) or over fresh on-policy samples (``estimation: resample``).
"""

from __future__ import annotations

from typing import Any

import torch

from ipg_lightning.attribution.estimator import group_advantages, integrate_path, move_along_path, surrogate_weights
from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.attribution.paths import integrate_fixed, path_groups, score_total
from ipg_lightning.data import ReasoningBatch, batch_subset
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood
from ipg_lightning.rollout.trajectories import Trajectories


class IntegratedPolicyGradient(AttributionMethod):
    """IPG: the policy gradient integrated along the straight gate path from the baseline to 1."""

    name = "ipg"
    needs_reward_signal = True
    has_completeness = True
    samples = True
    retries_signal = True
    splits_per_token = True
    weighs_surrogate = True

    def step(self, batch: ReasoningBatch) -> None:
        """Sample, score, take advantages, and integrate along every path (prompts without signal skipped)."""
        task = self.task
        trajectories = task.sample(batch)
        rewards = task.rewards(batch, trajectories)
        redrawn = {"redrawn_groups": 0, "redrawn_tokens": 0}
        if task.settings.signal_retries:
            trajectories, rewards, redrawn = self._redraw_silent_groups(batch, trajectories, rewards)
        counts = {**task.sample_counts(batch, trajectories, rewards), **redrawn}
        advantages, has_signal = group_advantages(rewards, task.settings.advantage)
        task.keep(batch, trajectories, rewards, advantages)
        counts["signal_prompts"] = int(has_signal.sum())
        task.log("zero_signal_prompts", float((~has_signal).sum()), prog_bar=True, reduce_fx="sum", batch_size=len(batch["prompt"]))
        if not has_signal.any():
            task.accumulator.update(**counts)
            return
        if task.settings.estimation == "resample":
            scores, delta = self._integrate_resampled(batch, rewards)
        else:
            rows = [row for row in range(len(trajectories)) if has_signal[trajectories.prompt_index[row]]]
            with_signal = trajectories.select(rows)
            lengths = [len(ids) for ids in with_signal.completion_ids]
            weights = surrogate_weights(advantages.flatten()[rows], lengths, task.sampling.num_samples, task.settings.surrogate)
            passes = task.teacher_forced_passes()
            scores, delta = integrate_fixed(
                task.lm,
                task.gates,
                with_signal,
                weights,
                task.settings.path,
                task.settings.baseline,
                self.quadrature,
                passes,
            )
        task.accumulator.update(scores=scores, score_sum=score_total(scores), surrogate_delta=delta, **counts)

    def _redraw_silent_groups(
        self, batch: ReasoningBatch, trajectories: Trajectories, rewards: torch.Tensor
    ) -> tuple[Trajectories, torch.Tensor, dict[str, int]]:
        """Redraw the N samples of every prompt whose rewards are all equal, up to ``signal_retries`` times.

        Attempt r draws sample indices r N .. (r + 1) N - 1 of the still-silent prompts; the first
        group whose rewards differ replaces the prompt's group. The kept trajectories stay ordered
        by prompt, N per prompt.
        """
        task = self.task
        n = task_samples = task.sampling.num_samples
        groups = [trajectories.select(range(p * n, (p + 1) * n)) for p in range(len(batch["prompt"]))]
        rewards, counts = rewards.clone(), {"redrawn_groups": 0, "redrawn_tokens": 0}
        for attempt in range(1, task.settings.signal_retries + 1):
            silent = [p for p, signal in enumerate(group_advantages(rewards, task.settings.advantage)[1]) if not signal]
            if not silent:
                break
            subset = batch_subset(batch, silent)
            fresh = task.sample(subset, first_sample=attempt * task_samples)
            fresh_rewards = task.rewards(subset, fresh)
            counts["redrawn_tokens"] += fresh.num_completion_tokens
            for index, (prompt, signal) in enumerate(zip(silent, group_advantages(fresh_rewards, task.settings.advantage)[1], strict=True)):
                if signal:
                    groups[prompt], rewards[prompt] = fresh.select(range(index * n, (index + 1) * n)), fresh_rewards[index]
                    counts["redrawn_groups"] += 1
        return Trajectories.of_groups(groups), rewards, counts

    def _integrate_resampled(self, batch: ReasoningBatch, rewards_at_one: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        task = self.task
        settings = task.settings

        def on_policy_gradient(alpha: float) -> float:
            fresh = task.sample(batch)
            advantages, _ = group_advantages(task.rewards(batch, fresh), settings.advantage)
            weights = (advantages.flatten() / task.sampling.num_samples).float()
            passes = task.teacher_forced_passes(reuse_prefix=False)  # fresh trajectories: nothing to replay
            return backward_weighted_log_likelihood(task.lm, fresh, weights, passes=passes)

        rule, steps = self.quadrature
        scores, delta = {}, 0.0
        reward_at_one = rewards_at_one.mean(1).sum().item()
        for group in path_groups(task.gates, settings.path):
            result = integrate_path(task.gates, group, on_policy_gradient, settings.baseline, rule, steps)
            scores.update(result.scores)
            move_along_path(task.gates, group, settings.baseline, 0.0)
            reward_at_baseline = task.rewards(batch, task.sample(batch)).mean(1).sum().item()
            task.gates.reset(1.0)
            delta += reward_at_one - reward_at_baseline  # J(1) - J(c'), summed over prompts
        return scores, delta

    def uninformative_reason(self, state: dict[str, Any]) -> str | None:
        """No prompt had N rewards that differ: there is no policy gradient to integrate."""
        if state["signal_prompts"] > 0:
            return None
        prompts, num_samples = int(state["prompts"]), self.task.sampling.num_samples
        mean = state["reward_sum"] / max(state["trajectories"], 1.0)
        return (
            f"none of the {prompts} support prompts carried signal: the {num_samples} rewards of each "
            f"prompt were all equal (mean reward {mean:.3g}). Draw more samples (num_samples), sample at a higher "
            "temperature, or use problems the model solves sometimes but not always"
        )

    def counts(self, state: dict[str, Any]) -> dict[str, int | None]:
        """Prompts whose N rewards were all equal (skipped)."""
        return {"zero_signal_prompts": int(state["prompts"] - state["signal_prompts"]), "above_mean_trajectories": None}

    def completeness_target(self) -> str:
        """L(1) - L(c') over fixed trajectories; the expected reward J(1) - J(c') when resampling."""
        return "J(1) - J(baseline)" if self.task.settings.estimation == "resample" else "L(1) - L(baseline)"


class GradientTimesActivation(IntegratedPolicyGradient):
    """``grad_x_act``: IPG without integration, one quadrature point at alpha = 1."""

    name = "grad_x_act"

    @property
    def quadrature(self) -> tuple[str, int]:
        """One right-endpoint point, whatever ``rule`` and ``steps`` say."""
        return "right", 1
