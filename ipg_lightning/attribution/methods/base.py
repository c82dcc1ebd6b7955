"""What every attribution method provides to :class:`~ipg_lightning.attribution.IPGAttribution`.

A method is a small strategy object: the LightningModule samples nothing and decides nothing on
its own; it calls the method's :meth:`~AttributionMethod.step` on every batch, and at the end asks
it for the scores, for a reason the run carries no information, and for its report metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.accumulator import AttributionAccumulator
from ipg_lightning.attribution.estimator import SURROGATES
from ipg_lightning.checks import check_at_least
from ipg_lightning.data import ReasoningBatch
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories


@dataclass(frozen=True)
class MethodSettings:
    """The settings an attribution method reads; :class:`~ipg_lightning.attribution.IPGAttribution` fills them from its own.

    Args:
        advantage: how rewards become advantages within a prompt's N samples (``rloo``, ``grpo``, ``none``).
        steps: quadrature points along the path.
        rule: the quadrature rule.
        baseline: the gate value the path starts from.
        estimation: ``fixed`` (the same trajectories at every point) or ``resample`` (fresh ones at each).
        path: ``layer`` (one path per block) or ``family`` (one per family and block).
        signal_retries: how often the samples of a prompt with equal rewards are redrawn.
        chunk_size: rows per teacher-forced pass.
        surrogate: ``sum`` (each trajectory's log-likelihood, the paper's) or ``token_mean`` (divided
            by the trajectory's length; removes the length term of a length reward).
    """

    advantage: str = "rloo"
    steps: int = 10
    rule: str = "gauss_legendre"
    baseline: float = 0.0
    estimation: str = "fixed"
    path: str = "layer"
    signal_retries: int = 0
    chunk_size: int = 8
    surrogate: str = "sum"

    def __post_init__(self) -> None:
        if self.estimation not in ("fixed", "resample") or self.path not in ("layer", "family"):
            raise ValueError(f"estimation must be fixed|resample and path layer|family, got {self.estimation!r}, {self.path!r}")
        if not self.baseline < 1:
            raise ValueError(f"baseline must be < 1 (the path runs from it to 1), got {self.baseline}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"Unknown surrogate {self.surrogate!r}; choose from {list(SURROGATES)}")
        check_at_least(1, steps=self.steps, chunk_size=self.chunk_size)
        check_at_least(0, signal_retries=self.signal_retries)


class AttributionRun(Protocol):
    """What a method reads and writes while it runs; :class:`~ipg_lightning.attribution.IPGAttribution` provides it."""

    lm: nn.Module
    tokenizer: PreTrainedTokenizerBase
    gates: ComponentGates
    sampling: SamplingConfig
    accumulator: AttributionAccumulator
    settings: MethodSettings

    def sample(self, batch: ReasoningBatch) -> Trajectories:
        """N trajectories per prompt from the model as currently gated."""

    def rewards(self, batch: ReasoningBatch, trajectories: Trajectories) -> torch.Tensor:
        """The (prompts x N) reward matrix."""

    def sample_counts(self, batch: ReasoningBatch, trajectories: Trajectories, rewards: torch.Tensor) -> dict[str, float]:
        """The counters of a sampled step."""

    def keep(self, batch: ReasoningBatch, trajectories: Trajectories, rewards: torch.Tensor, advantages: torch.Tensor | None = None) -> None:
        """Keep a batch's scored trajectories for the report, if the run keeps them."""

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a value (Lightning's ``LightningModule.log``)."""


class AttributionMethod:
    """One attribution method, bound to the module that runs it.

    Class attributes say what the method is; subclasses implement :meth:`step` and, where the
    per-prompt mean of the accumulated scores is not the answer, :meth:`scores`.
    """

    #: The name used in recipes, the CLI and reports.
    name: ClassVar[str]
    #: Needs N sampled rewards per prompt that can differ (policy-gradient methods).
    needs_reward_signal: ClassVar[bool] = False
    #: Its scores add up to a quantity the report checks (the completeness block).
    has_completeness: ClassVar[bool] = False
    #: Samples trajectories from the model (which ``keep_trajectories`` can keep with the report).
    samples: ClassVar[bool] = False
    #: Redraws the N samples of a prompt whose rewards were all equal (``signal_retries``).
    retries_signal: ClassVar[bool] = False
    #: Its scores split into per-token contributions along its path (the explorer shades tokens by them).
    splits_per_token: ClassVar[bool] = False
    #: Weighs its sampled trajectories by their advantages in a policy-gradient surrogate, whose form ``surrogate`` chooses.
    weighs_surrogate: ClassVar[bool] = False

    def __init__(self, task: AttributionRun) -> None:
        self.task = task

    @property
    def quadrature(self) -> tuple[str, int]:
        """The quadrature ``(rule, steps)`` this method actually uses."""
        return self.task.settings.rule, self.task.settings.steps

    def step(self, batch: ReasoningBatch) -> None:
        """Attribute one batch of support prompts: add sums and counters to ``task.accumulator``."""
        raise NotImplementedError

    def scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Final per-site scores from the reduced state: by default per-prompt means of the score sums."""
        prompts = max(state["prompts"], 1.0)
        return {name: (total / prompts).float() for name, total in state["score"].items()}

    def uninformative_reason(self, state: dict[str, Any]) -> str | None:
        """Why the reduced state ranks nothing (beyond an empty support set), else None."""
        return None

    def counts(self, state: dict[str, Any]) -> dict[str, int | None]:
        """Method-specific counters for the report's ``counts`` block."""
        return {"zero_signal_prompts": None, "above_mean_trajectories": None}

    def completeness_target(self) -> str:
        """What the scores should add up to (for methods with a completeness check)."""
        return "L(1) - L(baseline)"
