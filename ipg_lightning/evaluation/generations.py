"""Generate completions for reasoning prompts and measure them with the reasoning metrics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ipg_lightning.data import ReasoningBatch
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.metrics import ReasoningMetrics
from ipg_lightning.metrics.functional import DEFAULT_REFLECTION_MARKERS
from ipg_lightning.model.interventions import attached
from ipg_lightning.rewards.completions import completions_of
from ipg_lightning.rewards.functions import reasoning_length
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.vectors import SteeringVectors


@dataclass
class EvaluationResult:
    """Metrics over a set of prompts, and one record per generated completion."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]


def evaluate_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[ReasoningBatch],
    sampling: SamplingConfig,
    gates: ComponentGates | None = None,
    vectors: SteeringVectors | None = None,
    reflection_markers: Sequence[str] = DEFAULT_REFLECTION_MARKERS,
    progress: bool = False,
    description: str = "evaluating",
) -> EvaluationResult:
    """Sample completions for every batch of a :class:`~ipg_lightning.data.ReasoningDataModule`
    loader (with ``gates`` and then ``vectors`` attached if given) and compute accuracy, answer rate,
    reasoning length and reflection rate, and with several samples per problem avg@k and pass@k."""
    metrics = ReasoningMetrics(reflection_markers, samples_per_problem=sampling.num_samples)
    records: list[dict[str, Any]] = []
    batches = list(batches)
    with attached(model, gates, vectors):
        for batch in tqdm(batches, desc=description, unit="batch", disable=None if progress else True):
            trajectories = sample_trajectories(model, tokenizer, batch["prompt"], sampling, prompt_seeds=batch["seed"].tolist())
            completions = completions_of(trajectories, batch["prompt"], batch["answer"], tokenizer)
            lengths = [reasoning_length(c) for c in completions]
            metrics.update([c.text for c in completions], [c.gold for c in completions], lengths)
            for row, completion in enumerate(completions):
                records.append(
                    {
                        "id": batch["id"][trajectories.prompt_index[row]],
                        "sample": trajectories.sample_index[row],
                        "gold": completion.gold,
                        "completion": completion.text,
                        "num_tokens": completion.num_tokens,
                        "reasoning_length": lengths[row],
                    }
                )
    return EvaluationResult(metrics={**metrics.compute(), "num_completions": len(records)}, records=records)
