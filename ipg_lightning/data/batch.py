"""The batch every loader of :class:`~ipg_lightning.data.ReasoningDataModule` yields.

Attribution, steering, evaluation and the reasoner's training all read these keys; this type is
the one place that says what they hold.
"""

from __future__ import annotations

from typing import TypedDict

import torch


class ReasoningBatch(TypedDict):
    """A batch of reasoning problems.

    Keys:
        id: the example ids (stable across runs; used in messages and records).
        prompt: the prompts as the model sees them (template and chat template applied).
        question: the raw questions.
        answer: the gold final answers (None where a source has none).
        solution: the reference solutions (None or "" where a source has none).
        seed: one seed per example (long tensor); sampling mixes it into every completion's seed.
    """

    id: list[str]
    prompt: list[str]
    question: list[str]
    answer: list[str | None]
    solution: list[str | None]
    seed: torch.Tensor


def batch_subset(batch: ReasoningBatch, rows: list[int]) -> ReasoningBatch:
    """The examples ``rows`` of ``batch``, in that order, as a batch of their own."""
    subset = {key: [values[row] for row in rows] for key, values in batch.items() if key != "seed"}
    return ReasoningBatch(**subset, seed=batch["seed"][rows])


def require_solutions(batch: ReasoningBatch, what: str) -> list[str]:
    """The batch's reference solutions; raise ``ValueError`` naming examples that have none.

    Args:
        batch: a batch of a reasoning data module.
        what: the setting that needs them, for the message (e.g. ``"The supervised objective"``).
    """
    missing = [example_id for example_id, solution in zip(batch["id"], batch["solution"], strict=True) if not solution]
    if missing:
        raise ValueError(f"{what} needs reference solutions; examples {missing[:5]} have none: use a source with solutions")
    return list(batch["solution"])
