"""Stateful torchmetrics for reasoning benchmarks; the computation lives in ``functional``.

All states reduce across processes (``sum`` counters, ``cat`` for the length distribution), so
the metrics give the same value under DDP as on one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ipg_lightning.metrics import functional as F


class _RateMetric(Metric):
    """A fraction ``hits / total`` kept as two summed counters."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, flags: torch.Tensor) -> None:
        self.hits += flags.sum().to(self.hits.device)
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        """The fraction so far (0 before any update)."""
        return self.hits.float() / self.total.clamp(min=1)


class ReasoningAccuracy(_RateMetric):
    """Fraction of completions whose extracted final answer equals the gold answer.

    Example:
        >>> metric = ReasoningAccuracy()
        >>> metric.update(["2+2=4\\n#### 4", "The answer is 5."], ["4", "4"])
        >>> metric.compute()
        tensor(0.5000)
    """

    def update(self, completions: Sequence[str], golds: Sequence[str], hits: torch.Tensor | None = None) -> None:
        """Add a batch of completions and their gold answers; ``hits`` (1 per correct completion), when
        the batch is already graded, spares grading it again."""
        self._add(F.correct_counts(completions, golds) if hits is None else hits)


class AnswerRate(_RateMetric):
    """Fraction of completions from which a final answer can be extracted.

    Example:
        >>> metric = AnswerRate()
        >>> metric.update(["#### 4", "I am not sure."])
        >>> metric.compute()
        tensor(0.5000)
    """

    def update(self, completions: Sequence[str]) -> None:
        """Add a batch of completions."""
        self._add(F.answer_flags(completions))


class ReflectionRate(_RateMetric):
    """Fraction of completions containing a reflection marker ("wait", "let me check", ...).

    Args:
        markers: phrases that count as reflection, matched case-insensitively as whole words.

    Example:
        >>> metric = ReflectionRate(markers=["wait"])
        >>> metric.update(["Wait, 3 + 4 = 7.", "3 + 4 = 7.", "Awaiting"])
        >>> metric.compute()
        tensor(0.3333)
    """

    higher_is_better = None

    def __init__(self, markers: Sequence[str] = F.DEFAULT_REFLECTION_MARKERS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.markers = tuple(markers)
        F.reflection_pattern(self.markers)  # fail early on an empty marker list

    def update(self, completions: Sequence[str]) -> None:
        """Add a batch of completions."""
        self._add(F.reflection_counts(completions, self.markers) > 0)


class PassAtK(Metric):
    """pass@k for each k in ``ks``: the chance that at least one of k samples of a problem is correct,
    estimated without bias from n >= k samples per problem and averaged over problems.

    Args:
        ks: the k values to report.

    Example:
        >>> metric = PassAtK(ks=(1, 2))
        >>> metric.update(torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'pass@1': 0.625, 'pass@2': 0.75}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1,), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        self.ks = tuple(ks)
        self.add_state("estimates", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hits: torch.Tensor) -> None:
        """Add problems: ``hits`` is (problems x samples), 1 where a sample is correct."""
        hits = torch.as_tensor(hits)
        self.estimates += torch.stack([F.pass_at_k(hits, k).sum() for k in self.ks]).to(self.estimates.device)
        self.problems += hits.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """pass@k per k, averaged over the problems seen so far (0 before any)."""
        return {f"pass@{k}": value / self.problems.clamp(min=1) for k, value in zip(self.ks, self.estimates, strict=True)}


class ReasoningLength(Metric):
    """Distribution of reasoning lengths (tokens): mean, min, max and quantiles.

    Args:
        quantiles: which quantiles to report, as fractions.

    Example:
        >>> metric = ReasoningLength(quantiles=(0.5,))
        >>> metric.update(torch.tensor([10, 20]))
        >>> metric.update([30])
        >>> {k: v.item() for k, v in metric.compute().items()}
        {'mean': 20.0, 'min': 10.0, 'max': 30.0, 'q50': 20.0}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, quantiles: Sequence[float] = (0.5, 0.9), **kwargs) -> None:
        super().__init__(**kwargs)
        if not all(0 <= q <= 1 for q in quantiles):
            raise ValueError(f"Quantiles must lie in [0, 1], got {list(quantiles)}")
        self.quantiles = tuple(quantiles)
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, lengths: torch.Tensor | Sequence[float]) -> None:
        """Add the reasoning lengths of a batch of completions."""
        lengths = torch.as_tensor(lengths, dtype=torch.float32, device=self.device).flatten()
        if (lengths < 0).any() or not torch.isfinite(lengths).all():
            raise ValueError("Reasoning lengths must be finite and non-negative")
        self.lengths.append(lengths)

    def compute(self) -> dict[str, torch.Tensor]:
        """Summary statistics of all lengths seen so far."""
        return F.length_summary(dim_zero_cat(self.lengths), self.quantiles)


class ReasoningMetrics(nn.Module):
    """The reasoning metrics of one set of completions, updated together: accuracy, answer rate,
    reflection rate and reasoning length, and with k > 1 samples per problem avg@k and pass@k.

    Args:
        reflection_markers: phrases that count as re-checking a step (see :class:`ReflectionRate`).
        samples_per_problem: completions per problem, each problem's in a row in every update.
    """

    def __init__(self, reflection_markers: Sequence[str] = F.DEFAULT_REFLECTION_MARKERS, samples_per_problem: int = 1) -> None:
        super().__init__()
        if samples_per_problem < 1:
            raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
        self.samples_per_problem = samples_per_problem
        self.accuracy = ReasoningAccuracy()
        self.answer_rate = AnswerRate()
        self.reflection_rate = ReflectionRate(reflection_markers)
        self.reasoning_length = ReasoningLength()
        self.pass_at_k = PassAtK(F.default_pass_ks(samples_per_problem))

    def update(self, completions: Sequence[str], golds: Sequence[str | None], lengths: Sequence[float]) -> None:
        """Add completions with their gold answers and reasoning lengths (problem by problem, each
        problem's ``samples_per_problem`` completions in a row)."""
        if len(completions) % self.samples_per_problem:
            raise ValueError(f"Got {len(completions)} completions, not a multiple of {self.samples_per_problem} samples per problem")
        hits = F.correct_counts(completions, golds)
        self.accuracy.update(completions, golds, hits)
        self.pass_at_k.update(hits.view(-1, self.samples_per_problem))
        self.answer_rate.update(completions)
        self.reflection_rate.update(completions)
        self.reasoning_length.update(lengths)

    def compute(self) -> dict[str, float]:
        """Accuracy, answer rate, reflection rate, the reasoning-length mean and quantiles, and with
        k > 1 samples per problem ``avg@k`` (the accuracy) and ``pass@k``, as floats."""
        lengths = {f"reasoning_length_{key}": value.item() for key, value in self.reasoning_length.compute().items()}
        accuracy = self.accuracy.compute().item()
        sampled = {}
        if self.samples_per_problem > 1:
            sampled = {f"avg@{self.samples_per_problem}": accuracy, **{k: v.item() for k, v in self.pass_at_k.compute().items()}}
        return {
            "accuracy": accuracy,
            **sampled,
            "answer_rate": self.answer_rate.compute().item(),
            "reflection_rate": self.reflection_rate.compute().item(),
            **lengths,
        }
