"""The training objectives of learned steering, one loss function each (``docs/method.md`` section 7).

- ``policy_gradient``: on-policy REINFORCE with the RLOO advantage on the reward, plus
  ``kl_coef * KL(pi_c || pi_base)`` (k3 estimator on the sampled tokens) when asked;
- ``supervised``: cross-entropy of reference reasoning traces (teacher forcing).

Each takes the :class:`~ipg_lightning.steering.learned.GateSteering` module and a batch, logs what it
measures, and returns the loss before the gate penalty (which the module adds for every objective).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.estimator import group_advantages
from ipg_lightning.data import ReasoningBatch, require_solutions
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.rewards.completions import reward_matrix
from ipg_lightning.rewards.functions import Reward
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import completion_log_probs, completion_mask
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories, teacher_forced_trajectories
from ipg_lightning.steering.finetune.slices import slices_disabled
from ipg_lightning.vectors.additive import SteeringVectors


class SteeringRun(Protocol):
    """What an objective reads; :class:`~ipg_lightning.steering.learned.GateSteering` provides it."""

    lm: nn.Module
    tokenizer: PreTrainedTokenizerBase
    gates: ComponentGates | None
    vectors: SteeringVectors | None
    hparams: Any

    def steering(self) -> AbstractContextManager:
        """Attach the gates and vectors that steer ``lm`` for the duration of a block."""

    @property
    def reward_fn(self) -> Reward:
        """The reward of the policy-gradient objective."""

    def training_sampling(self) -> SamplingConfig:
        """This step's sampling settings."""

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a value (Lightning's ``LightningModule.log``)."""


def supervised_loss(module: SteeringRun, batch: ReasoningBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the reference solutions under the steered model."""
    solutions = require_solutions(batch, "The supervised objective")
    trajectories = teacher_forced_trajectories(module.tokenizer, batch["prompt"], solutions)
    log_probs, mask = _steered_log_probs(module, trajectories)
    loss = -(log_probs * mask).sum() / mask.sum()
    module.log("train/nll", loss.detach(), prog_bar=True, batch_size=len(batch["prompt"]))
    return loss


def policy_gradient_loss(module: SteeringRun, batch: ReasoningBatch) -> torch.Tensor:
    """``-sum_n A_n/N sum_t log pi_c(a_t^n)`` per prompt over fresh samples (RLOO), plus the KL term."""
    prompts = len(batch["prompt"])
    sampling = module.training_sampling()
    with torch.no_grad(), module.steering():
        trajectories = sample_trajectories(module.lm, module.tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
    rewards = reward_matrix(module.reward_fn, trajectories, batch["prompt"], batch["answer"], module.tokenizer).float()
    advantages, _ = group_advantages(rewards, "rloo")
    log_probs, mask = _steered_log_probs(module, trajectories)
    weights = (advantages.flatten() / sampling.num_samples).to(log_probs)
    loss = -(weights * log_probs.sum(-1)).sum() / prompts
    if module.hparams.kl_coef > 0:
        kl = _kl_to_base(module, trajectories, log_probs, mask)
        loss = loss + module.hparams.kl_coef * kl
        module.log("train/kl", kl.detach(), batch_size=prompts)
    module.log("train/reward", rewards.mean(), prog_bar=True, batch_size=prompts)
    return loss


class Objective(NamedTuple):
    """A training objective: its loss, and whether it samples (then N rewards per prompt must be able to differ)."""

    loss: Callable[[SteeringRun, ReasoningBatch], torch.Tensor]
    samples: bool


#: Every objective by name.
OBJECTIVES: dict[str, Objective] = {
    "policy_gradient": Objective(policy_gradient_loss, samples=True),
    "supervised": Objective(supervised_loss, samples=False),
}


def _steered_log_probs(module: SteeringRun, trajectories: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    with module.steering():
        log_probs = completion_log_probs(module.lm, trajectories)
    return log_probs, completion_mask(trajectories, log_probs)


def _kl_to_base(module: SteeringRun, trajectories: Trajectories, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_c || pi_base) on the sampled tokens; the base is the model without gates, vectors, adapter or slices."""
    disable_adapter = getattr(module.lm, "disable_adapter", None)
    with torch.no_grad(), disable_adapter() if disable_adapter is not None else nullcontext(), slices_disabled(module.lm):
        base = completion_log_probs(module.lm, trajectories)
    log_ratio = base - log_probs
    k3 = torch.exp(log_ratio) - 1 - log_ratio  # >= 0, unbiased for KL(pi_c || pi_base)
    return (k3 * mask).sum() / mask.sum().clamp(min=1)
