"""Integration over fixed trajectories along every gate path of an attribution run.

``path: layer`` moves each site's gates alone (one path per site); ``path: family`` moves all sites
of a family together. Over fixed trajectories the surrogate ``L`` is a deterministic function of the
gates, so its values at the path's ends give the completeness target ``L(1) - L(c')``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ipg_lightning.attribution.estimator import integrate_path, move_along_path
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.rollout.passes.teacher_forced import TeacherForcedPasses
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood, weighted_log_likelihood
from ipg_lightning.rollout.trajectories import Trajectories


def score_total(scores: dict[str, torch.Tensor]) -> float:
    """The sum of every component's score (in float64): what completeness compares with the target."""
    return sum(float(vector.double().sum()) for vector in scores.values())


def path_groups(gates: ComponentGates, path: str) -> list[list[str]]:
    """The groups of sites whose gates move together: one per site (``layer``) or per family (``family``)."""
    return site_path_groups({name: site.family for name, site in gates.sites.items()}, path)


def site_path_groups(families: Mapping[str, str], path: str) -> list[list[str]]:
    """:func:`path_groups` from a mapping of site name to family (e.g. a report's sites)."""
    if path == "layer":
        return [[name] for name in families]
    groups: dict[str, list[str]] = {}
    for name, family in families.items():
        groups.setdefault(family, []).append(name)
    return list(groups.values())


def integrate_fixed(
    lm: nn.Module,
    gates: ComponentGates,
    trajectories: Trajectories,
    weights: torch.Tensor,
    path: str,
    baseline: float,
    quadrature: tuple[str, int],
    passes: TeacherForcedPasses,
) -> tuple[dict[str, torch.Tensor], float]:
    """Integrated gradients of ``L(c) = sum_n w_n sum_t log pi_c(a_t^n)`` over ``trajectories``, along every path.

    Args:
        lm: the model, with ``gates`` attached.
        gates: the attributed gates (left at 1 afterwards).
        trajectories: the fixed trajectories.
        weights: one weight per trajectory (:func:`~ipg_lightning.attribution.estimator.surrogate_weights` for IPG, 1 for reference solutions).
        path: ``layer`` or ``family`` (see :func:`path_groups`).
        baseline: the gate value c' where every path starts.
        quadrature: the rule and number of points.
        passes: how every pass over ``trajectories`` runs: the chunks, the frozen blocks replayed
            below the lowest gate, the checkpointed ones above (:mod:`ipg_lightning.rollout.passes.teacher_forced`; the
            scores are the same whichever is chosen).

    Returns the per-site scores and ``sum over paths of L(1) - L(c')``, computed from the quadrature
    points where they include the ends, else by one extra forward pass.
    """
    rule, steps = quadrature

    def gradient_at(alpha: float) -> float:
        return backward_weighted_log_likelihood(lm, trajectories, weights, passes=passes)

    scores, delta, value_at_one = {}, 0.0, None
    for group in path_groups(gates, path):
        result = integrate_path(gates, group, gradient_at, baseline=baseline, rule=rule, steps=steps)
        scores.update(result.scores)
        values = dict(zip(result.alphas, result.surrogate_values, strict=True))
        if value_at_one is None:
            value_at_one = values.get(1.0)
            if value_at_one is None:
                value_at_one = weighted_log_likelihood(lm, trajectories, weights, passes=passes)
        value_at_baseline = values.get(0.0)
        if value_at_baseline is None:
            move_along_path(gates, group, baseline, 0.0)
            value_at_baseline = weighted_log_likelihood(lm, trajectories, weights, passes=passes)
            gates.reset(1.0)
        delta += value_at_one - value_at_baseline
    return scores, delta
