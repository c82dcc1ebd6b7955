"""The Integrated Policy Gradient estimator: advantages, quadrature and the path integral.

``docs/method.md`` section 3 (completeness: section 4). For a group of sites whose gates move together from the
baseline ``c'`` to 1 (all other gates stay at 1)::

    IPG_i = (1 - c'_i) * sum_k w_k * dL/dc_i at c' + alpha_k (1 - c')

where ``L`` is the policy-gradient surrogate ``sum_n A_n / N * sum_t log pi_c(a_t^n | ...)`` (or,
with ``surrogate: token_mean``, each trajectory's sum divided by its length) over fixed
trajectories (``fixed`` estimation, exactly Integrated Gradients of ``L``), or the on-policy
surrogate over trajectories drawn afresh at every point (``resample``). This module holds the pure
parts; :mod:`ipg_lightning.attribution` orchestrates them in a Lightning loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ipg_lightning.gates.component_gates import ComponentGates

AdvantageMethod = Literal["rloo", "grpo", "none"]
QuadratureRule = Literal["right", "left", "midpoint", "trapezoid", "gauss_legendre"]
ADVANTAGE_METHODS: tuple[str, ...] = ("rloo", "grpo", "none")
QUADRATURE_RULES: tuple[str, ...] = ("right", "left", "midpoint", "trapezoid", "gauss_legendre")
#: How a trajectory's log-likelihood enters the surrogate: summed over its tokens, or their mean.
Surrogate = Literal["sum", "token_mean"]
SURROGATES: tuple[str, ...] = ("sum", "token_mean")
#: What a user may ask for: a surrogate, or ``auto`` (chosen from the reward and the method).
SurrogateChoice = Literal["auto", "sum", "token_mean"]


def group_advantages(rewards: torch.Tensor, method: AdvantageMethod = "rloo") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages within each prompt's group of N samples, and which groups carry any signal.

    Args:
        rewards: (prompts, N) rewards.
        method: ``rloo`` (r minus the mean of the other N-1; unbiased, default), ``grpo``
            ((r - mean) / std, the paper's; biased), or ``none`` (A = r).

    Returns ``(advantages, has_signal)``; groups whose N rewards are all equal get zero advantages.

    >>> advantages, signal = group_advantages(torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))
    >>> advantages
    tensor([[ 1.0000, -0.5000, -0.5000],
            [ 0.0000,  0.0000,  0.0000]])
    >>> signal
    tensor([ True, False])
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(rewards.shape)}")
    num_samples = rewards.shape[1]
    has_signal = rewards.amax(1) > rewards.amin(1)
    if method == "rloo":
        if num_samples < 2:
            raise ValueError("The rloo advantage needs at least 2 samples per prompt")
        advantages = rewards - (rewards.sum(1, keepdim=True) - rewards) / (num_samples - 1)
    elif method == "grpo":
        if num_samples < 2:
            raise ValueError("The grpo advantage needs at least 2 samples per prompt")
        std = rewards.std(1, keepdim=True)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / std.clamp(min=1e-8)
    elif method == "none":
        advantages = rewards.clone()
    else:
        raise ValueError(f"Unknown advantage {method!r}; choose from {list(ADVANTAGE_METHODS)}")
    return advantages * has_signal[:, None], has_signal


def surrogate_weights(advantages: torch.Tensor, lengths: Sequence[int], num_samples: int, surrogate: Surrogate = "sum") -> torch.Tensor:
    """Each trajectory's weight ``w_r`` in the surrogate ``L = sum_r w_r sum_t log pi(a_t^r | ...)``, in float32.

    ``sum`` (the paper's): ``w_r = A_r / N``. ``token_mean``: ``w_r = A_r / (N |tau_r|)``, each
    trajectory's log-likelihood divided by its number of generated tokens ``lengths[r]``. A change
    that lowers every token's log-probability by the same amount then leaves ``L`` where it was
    (each prompt's advantages sum to zero), so the part of a length score that comes from such a
    uniform drop, which makes components that damage the model look "lengthening", is gone; what
    remains is how the drop per token differs between long and short trajectories
    (``docs/method.md`` section 3).

    >>> surrogate_weights(torch.tensor([1.0, -1.0]), [4, 2], num_samples=2, surrogate="token_mean")
    tensor([ 0.1250, -0.2500])
    """
    weights = advantages.double() / num_samples
    if surrogate == "token_mean":
        weights = weights / torch.tensor(lengths, dtype=torch.float64).clamp(min=1)
    elif surrogate != "sum":
        raise ValueError(f"Unknown surrogate {surrogate!r}; choose from {list(SURROGATES)}")
    return weights.float()


def quadrature(rule: QuadratureRule = "gauss_legendre", steps: int = 10) -> tuple[list[float], list[float]]:
    """Points ``alpha_k`` in [0, 1] and weights ``w_k`` (summing to 1) of a quadrature rule.

    ``right`` is the paper's ``alpha_k = k / q``; ``trapezoid`` uses ``q + 1`` points.

    >>> quadrature("right", 4)
    ([0.25, 0.5, 0.75, 1.0], [0.25, 0.25, 0.25, 0.25])
    >>> quadrature("trapezoid", 2)
    ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rule == "right":
        alphas = [k / steps for k in range(1, steps + 1)]
    elif rule == "left":
        alphas = [k / steps for k in range(steps)]
    elif rule == "midpoint":
        alphas = [(k + 0.5) / steps for k in range(steps)]
    elif rule == "trapezoid":
        alphas = [k / steps for k in range(steps + 1)]
        weights = [1 / steps] * (steps + 1)
        weights[0] = weights[-1] = 1 / (2 * steps)
        return alphas, weights
    elif rule == "gauss_legendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)
        return [float((x + 1) / 2) for x in nodes], [float(w / 2) for w in node_weights]
    else:
        raise ValueError(f"Unknown quadrature rule {rule!r}; choose from {list(QUADRATURE_RULES)}")
    return alphas, [1 / steps] * steps


@torch.no_grad()
def move_along_path(gates: ComponentGates, site_names: Sequence[str], baseline: float, alpha: float) -> None:
    """Set the gates of ``site_names`` to ``baseline + alpha * (1 - baseline)``; others to 1."""
    moving = set(site_names)
    for name in gates.sites:
        gates.set_site(name, baseline + alpha * (1 - baseline) if name in moving else 1.0)


@dataclass
class PathIntegral:
    """Result of integrating one path: per-site scores and the surrogate at each quadrature point."""

    scores: dict[str, torch.Tensor]
    alphas: list[float]
    surrogate_values: list[float]


def integrate_path(
    gates: ComponentGates,
    site_names: Sequence[str],
    gradient_at: Callable[[float], float],
    baseline: float = 0.0,
    rule: QuadratureRule = "gauss_legendre",
    steps: int = 10,
) -> PathIntegral:
    """Integrated gradients of a surrogate along the straight path from ``baseline`` to 1.

    ``gradient_at(alpha)`` must backpropagate the surrogate with the gates already moved to the
    point ``alpha`` (gradients accumulate into the gates' ``.grad``) and return its value. Gates are
    left at 1 afterwards.
    """
    alphas, weights = quadrature(rule, steps)
    totals = {name: torch.zeros_like(gates.gate(name), dtype=torch.float64) for name in site_names}
    values = []
    try:
        for alpha, weight in zip(alphas, weights, strict=True):
            move_along_path(gates, site_names, baseline, alpha)
            for name in gates.sites:
                gates.gate(name).grad = None
            values.append(gradient_at(alpha))
            for name in site_names:
                gradient = gates.gate(name).grad
                if gradient is not None:
                    totals[name] += weight * gradient.double()
    finally:
        gates.reset(1.0)
        for name in gates.sites:
            gates.gate(name).grad = None
    scores = {name: ((1 - baseline) * total).float() for name, total in totals.items()}
    return PathIntegral(scores=scores, alphas=alphas, surrogate_values=values)
