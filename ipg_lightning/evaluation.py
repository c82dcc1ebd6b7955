"""Generate completions for reasoning prompts and measure them with the reasoning metrics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ipg_lightning.completions import completions_of
from ipg_lightning.gates import ComponentGates
from ipg_lightning.metrics import AnswerRate, ReasoningAccuracy, ReasoningLength, ReflectionRate
from ipg_lightning.metrics.functional import DEFAULT_REFLECTION_MARKERS
from ipg_lightning.rewards import reasoning_length
from ipg_lightning.trajectories import SamplingConfig, sample_trajectories


@dataclass
class EvaluationResult:
    """Metrics over a set of prompts, and one record per generated completion."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]


def evaluate_generations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[dict[str, Any]],
    sampling: SamplingConfig,
    gates: ComponentGates | None = None,
    reflection_markers: Sequence[str] = DEFAULT_REFLECTION_MARKERS,
    progress: bool = False,
    description: str = "evaluating",
) -> EvaluationResult:
    """Sample completions for every batch of a :class:`~ipg_lightning.data.ReasoningDataModule`
    loader (with ``gates`` attached if given) and compute accuracy, answer rate, reasoning length
    and reflection rate."""
    accuracy, answers, reflection, length = ReasoningAccuracy(), AnswerRate(), ReflectionRate(reflection_markers), ReasoningLength()
    records: list[dict[str, Any]] = []
    context = gates.attach(model) if gates is not None else nullcontext()
    batches = list(batches)
    with context:
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress):
            trajectories = sample_trajectories(model, tokenizer, batch["prompt"], sampling, prompt_seeds=batch["seed"].tolist())
            completions = completions_of(trajectories, batch["prompt"], batch["answer"], tokenizer)
            texts = [c.text for c in completions]
            golds = [c.gold for c in completions]
            lengths = [reasoning_length(c) for c in completions]
            accuracy.update(texts, golds)
            answers.update(texts)
            reflection.update(texts)
            length.update(lengths)
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
    length_summary = {f"reasoning_length_{k}": v.item() for k, v in length.compute().items()}
    metrics = {
        "accuracy": accuracy.compute().item(),
        "answer_rate": answers.compute().item(),
        "reflection_rate": reflection.compute().item(),
        **length_summary,
        "num_completions": len(records),
    }
    return EvaluationResult(metrics=metrics, records=records)
