"""``ig_reference``: Integrated Gradients of the teacher-forced likelihood of reference solutions.

No sampling and no reward: the surrogate is the log-likelihood of each prompt's reference solution,
integrated along the same gate path as IPG, so the two differ only in what they differentiate.
"""

from __future__ import annotations

import torch

from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.attribution.paths import integrate_fixed, score_total
from ipg_lightning.data import ReasoningBatch, require_solutions
from ipg_lightning.rollout.trajectories import check_context_length, teacher_forced_trajectories


class ReferenceIntegratedGradients(AttributionMethod):
    """IG of ``sum_n log pi_c(solution_n | prompt_n)`` from the baseline gate to 1."""

    name = "ig_reference"
    has_completeness = True

    def step(self, batch: ReasoningBatch) -> None:
        """Teacher-force the reference solutions and integrate their likelihood along every path."""
        task = self.task
        solutions = require_solutions(batch, "ig_reference")
        trajectories = teacher_forced_trajectories(task.tokenizer, batch["prompt"], solutions)
        lengths = [len(p) + len(c) for p, c in zip(trajectories.prompt_ids, trajectories.completion_ids, strict=True)]
        texts = [f"{p} {s}" for p, s in zip(batch["prompt"], solutions, strict=True)]
        check_context_length(task.lm, lengths, texts, what="prompt with its reference solution")
        weights = torch.ones(len(trajectories))
        settings = task.settings
        passes = task.teacher_forced_passes()
        scores, delta = integrate_fixed(
            task.lm,
            task.gates,
            trajectories,
            weights,
            settings.path,
            settings.baseline,
            self.quadrature,
            passes,
        )
        prompts = len(batch["prompt"])
        task.accumulator.update(
            scores=scores,
            score_sum=score_total(scores),
            surrogate_delta=delta,
            prompts=prompts,
            signal_prompts=prompts,
            trajectories=len(trajectories),
            tokens=trajectories.num_completion_tokens,
        )
