"""Pure functions behind the reasoning metrics; the ``Metric`` classes only keep state.

>>> reasoning_accuracy(["#### 4", "so 5", "none"], ["4", "4", "1"])
tensor(0.3333)
>>> reflection_rate(["Wait, let me check.", "Done."])
tensor(0.5000)
>>> pass_at_k(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 2)
tensor([0.5000, 0.0000], dtype=torch.float64)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ipg_lightning.rewards.answers import extract_answer, is_correct

#: Phrases that mark self-reflection in a reasoning trace (matched case-insensitively, whole words).
DEFAULT_REFLECTION_MARKERS: tuple[str, ...] = (
    "wait",
    "let me check",
    "let me double check",
    "double-check",
    "double check",
    "let me verify",
    "hmm",
    "on second thought",
)


def _check_lengths(predictions: Sequence[str], targets: Sequence[str]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"Got {len(predictions)} completions but {len(targets)} gold answers")


def correct_counts(completions: Sequence[str], golds: Sequence[str]) -> torch.Tensor:
    """Per completion, 1 if its extracted final answer matches the gold answer, else 0."""
    _check_lengths(completions, golds)
    return torch.tensor([is_correct(text, gold) for text, gold in zip(completions, golds, strict=True)], dtype=torch.long)


def reasoning_accuracy(completions: Sequence[str], golds: Sequence[str]) -> torch.Tensor:
    """Fraction of completions whose extracted final answer matches the gold answer."""
    return correct_counts(completions, golds).float().mean()


def pass_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """Per problem, the unbiased estimate of pass@k from ``hits`` (problems x n, 1 = correct):
    ``1 - C(n - c, k) / C(n, k)`` with c correct of n samples (Chen et al., 2021), computed as a
    stable product. pass@1 is the problem's mean accuracy."""
    if hits.dim() != 2:
        raise ValueError(f"hits must be (problems x samples), got shape {tuple(hits.shape)}")
    samples = hits.shape[1]
    if not 1 <= k <= samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {samples}")
    correct = hits.sum(dim=1).to(torch.float64)
    steps = torch.arange(samples - k + 1, samples + 1, dtype=torch.float64)  # i = n-k+1 .. n
    # C(n-c, k) / C(n, k) = prod_{i=n-k+1}^{n} (i - c) / i, with a factor <= 0 once n - c < k
    factors = ((steps[None, :] - correct[:, None]) / steps[None, :]).clamp(min=0)
    return 1 - factors.prod(dim=1)


def default_pass_ks(samples: int) -> tuple[int, ...]:
    """The k of pass@k reported for ``samples`` per problem: 1, powers of two below, and all of them.

    >>> default_pass_ks(1), default_pass_ks(8), default_pass_ks(12)
    ((1,), (1, 2, 4, 8), (1, 2, 4, 8, 12))
    """
    return tuple(sorted({2**power for power in range(samples.bit_length()) if 2**power <= samples} | {samples}))


def answer_flags(completions: Sequence[str]) -> torch.Tensor:
    """Per completion, 1 if a final answer can be extracted, else 0."""
    return torch.tensor([extract_answer(text) is not None for text in completions], dtype=torch.long)


def answer_rate(completions: Sequence[str]) -> torch.Tensor:
    """Fraction of completions with an extractable final answer."""
    return answer_flags(completions).float().mean()


def reflection_pattern(markers: Sequence[str]) -> re.Pattern:
    """A case-insensitive whole-word regex matching any of ``markers``."""
    if not markers:
        raise ValueError("At least one reflection marker is needed")
    alternatives = "|".join(re.escape(marker) for marker in sorted(markers, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def reflection_counts(completions: Sequence[str], markers: Sequence[str] = DEFAULT_REFLECTION_MARKERS) -> torch.Tensor:
    """Per completion, the number of reflection markers it contains."""
    pattern = reflection_pattern(markers)
    return torch.tensor([len(pattern.findall(text)) for text in completions], dtype=torch.long)


def reflection_rate(completions: Sequence[str], markers: Sequence[str] = DEFAULT_REFLECTION_MARKERS) -> torch.Tensor:
    """Fraction of completions that contain at least one reflection marker."""
    return (reflection_counts(completions, markers) > 0).float().mean()


def length_summary(lengths: torch.Tensor, quantiles: Sequence[float] = (0.5, 0.9)) -> dict[str, torch.Tensor]:
    """Mean, min, max and quantiles of reasoning lengths (a 1-D tensor of token counts).

    >>> {k: round(v.item(), 2) for k, v in length_summary(torch.tensor([2, 4, 6, 8])).items()}
    {'mean': 5.0, 'min': 2.0, 'max': 8.0, 'q50': 5.0, 'q90': 7.4}
    """
    if lengths.numel() == 0:
        raise ValueError("No lengths to summarise")
    values = lengths.float()
    summary = {"mean": values.mean(), "min": values.min(), "max": values.max()}
    for quantile in quantiles:
        summary[f"q{round(quantile * 100)}"] = torch.quantile(values, quantile)
    return summary
