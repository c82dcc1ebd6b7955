"""Teacher-forced scoring of trajectories: the log-probabilities of their generated tokens.

Scoring returns the per-token log-probabilities of the generated tokens only (prompt and padding
masked), differentiable with respect to component gates; the weighted sums over them are the
policy-gradient surrogate that attribution and learned steering backpropagate.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ipg_lightning.model.positions import completion_positions
from ipg_lightning.model.sites import unwrap_model
from ipg_lightning.rollout.passes import TeacherForcedPasses
from ipg_lightning.rollout.token_log_probs import target_log_probs
from ipg_lightning.rollout.trajectories import Trajectories


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters


def completion_log_probs(model: nn.Module, trajectories: Trajectories) -> torch.Tensor:
    """Teacher-forced log-probabilities of the generated tokens, shape (rows, completion_width).

    Entries outside ``completion_mask`` (padding after a completion ends) are 0. The result is
    differentiable with respect to whatever requires grad (gates attached to ``model``); only the
    logits of completion positions are computed when the model supports ``logits_to_keep``.
    """
    device = next(unwrap_model(model).parameters()).device
    batch = {k: v.to(device) for k, v in trajectories.padded().items()}
    completion_mask = batch.pop("completion_mask")
    prompt_width = max(len(ids) for ids in trajectories.prompt_ids)
    completion_width = completion_mask.shape[1] - prompt_width
    extra = {"logits_to_keep": completion_width + 1} if _accepts_logits_to_keep(model) else {}
    with completion_positions(completion_mask):  # for steering vectors added at generated positions only
        logits = model(**batch, use_cache=False, **extra).logits
    logits = logits[:, -(completion_width + 1) : -1]
    targets = batch["input_ids"][:, prompt_width:]
    log_probs = target_log_probs(logits, targets)
    return log_probs * completion_mask[:, prompt_width:]


def completion_mask(trajectories: Trajectories, log_probs: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of generated tokens aligned with ``completion_log_probs(model, trajectories)``."""
    return trajectories.padded()["completion_mask"][:, -log_probs.shape[1] :].to(log_probs.device)


def mean_completion_nll(model: nn.Module, trajectories: Trajectories) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (teacher forcing; padding excluded).

    The loss of next-token training on reference solutions, differentiable like
    :func:`completion_log_probs`.
    """
    log_probs = completion_log_probs(model, trajectories)
    mask = completion_mask(trajectories, log_probs)
    return -(log_probs * mask).sum() / mask.sum().clamp(min=1)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on all of ``model``'s own parameters; restore the flags on exit.

    Backward then computes only what gates (parameters outside the model) need.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _weighted_log_likelihood(
    model: nn.Module, trajectories: Trajectories, weights: torch.Tensor, chunk_size: int, backward: bool, passes: TeacherForcedPasses | None
) -> float:
    if weights.shape != (len(trajectories),):
        raise ValueError(f"Expected one weight per trajectory ({len(trajectories)}), got shape {tuple(weights.shape)}")
    passes = passes if passes is not None else TeacherForcedPasses(model, chunk_size)
    total = 0.0
    with frozen_parameters(model), torch.set_grad_enabled(backward):
        for rows, chunk in passes.chunks(trajectories):
            with passes.run(rows):
                log_probs = completion_log_probs(model, chunk)
                chunk_weights = weights[rows.start : rows.stop].to(device=log_probs.device, dtype=torch.float32)
                surrogate = (chunk_weights * log_probs.sum(-1)).sum()
                if backward and surrogate.requires_grad:
                    surrogate.backward()
            total += surrogate.item()
    return total


def weighted_log_likelihood(
    model: nn.Module, trajectories: Trajectories, weights: torch.Tensor, chunk_size: int = 8, passes: TeacherForcedPasses | None = None
) -> float:
    """The value of ``L = sum_r weights[r] * sum_t log pi(a_t^r | ...)``, without gradients.

    ``passes`` (:class:`~ipg_lightning.rollout.passes.teacher_forced.TeacherForcedPasses`) decides the chunks instead of
    ``chunk_size`` and replays or checkpoints blocks, the same way for every pass over ``trajectories``.
    """
    return _weighted_log_likelihood(model, trajectories, weights, chunk_size, backward=False, passes=passes)


def backward_weighted_log_likelihood(
    model: nn.Module,
    trajectories: Trajectories,
    weights: torch.Tensor,
    chunk_size: int = 8,
    passes: TeacherForcedPasses | None = None,
) -> float:
    """Backpropagate ``L = sum_r weights[r] * sum_t log pi(a_t^r | ...)`` in chunks of rows.

    This is the policy-gradient surrogate with ``weights`` as advantages: gradients accumulate into
    the ``.grad`` of the attached gates, the model's own parameters are frozen, and peak memory is
    bounded by ``chunk_size`` rows. ``passes`` (:class:`~ipg_lightning.rollout.passes.teacher_forced.TeacherForcedPasses`)
    decides the chunks instead (by rows and tokens), and replays the frozen blocks below the gates
    or checkpoints the live ones, the same way for every pass over ``trajectories``. Returns the value of ``L``.
    """
    return _weighted_log_likelihood(model, trajectories, weights, chunk_size, backward=True, passes=passes)
