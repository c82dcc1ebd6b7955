"""What a steering vector's direction reads on the kept trajectories: the projection of its site's activation on it, token by token.

A steering vector ``v`` at a site adds ``alpha * v`` to that site's activation ``h``. Before steering
anything, the question a user asks is whether the model's own trajectories already move along ``v``:
does the projection ``<h_t, v / |v|>`` rise where the model re-checks, is it higher on long traces or
on right ones? One forward pass over an attribution's kept trajectories (at gates = 1, no vector
added) answers it: the projection at every generated token, its mean per trajectory, its mean per
decile of the reasoning (the explorer's buckets), and how the trajectories' means go with their
reward, their length and their correctness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ipg_lightning.attribution.activations import component_activations, whole_activation
from ipg_lightning.attribution.kept import KeptTrajectories
from ipg_lightning.explorer.traces import BUCKETS, reasoning_buckets
from ipg_lightning.vectors.additive import SteeringVectors


@dataclass
class VectorTrace:
    """One steering vector on the kept trajectories.

    Args:
        name: ``LABEL @ SITE`` (the label names the vector file, e.g. its stem).
        site: the site the vector is added at, e.g. ``blocks.3.hook_resid_post``.
        alpha: the strength its file adds it with (what it adds is ``alpha * v``).
        norm: ``|v|``; the projections are on the unit direction ``v / |v|``.
        positions: where the file adds it (``all`` or ``generated``).
        provenance: where the vector comes from, as its file records it.
        center: the mean projection over every generated token of the kept trajectories (the page
            shades tokens by their projection minus this).
        trajectory_means: per kept trajectory (in the report's order), its mean projection over its generated tokens.
        bucket_means: the mean of (projection - ``center``) over the generated tokens in each decile of
            the reasoning, then the answer (0 for a bucket no token falls in).
        correlations: Pearson correlation of ``trajectory_means`` with ``reward`` and ``reasoning_tokens``
            over the kept trajectories (None where either side is constant).
        right_mean: mean of ``trajectory_means`` over trajectories with a right final answer (None if none).
        wrong_mean: the same over wrong ones (trajectories without a gold answer are in neither).
        rows: the kept trajectories shown: the highest mean projections first, then the lowest.
        highest: how many of ``rows`` are the highest (the rest are the lowest, lowest first).
        projections: per row of ``rows``, the projection at each generated token.
    """

    name: str
    site: str
    alpha: float
    norm: float
    positions: str
    provenance: dict[str, Any]
    center: float
    trajectory_means: list[float]
    bucket_means: list[float]
    correlations: dict[str, float | None]
    right_mean: float | None
    wrong_mean: float | None
    rows: list[int]
    highest: int
    projections: list[list[float]]


def trace_vectors(
    model: nn.Module,
    vectors: Mapping[str, SteeringVectors],
    kept: KeptTrajectories,
    rows_per_vector: int = 8,
    chunk_size: int = 8,
    progress: bool = True,
) -> dict[str, VectorTrace]:
    """Project the kept trajectories' activations on every vector of ``vectors`` (label -> a file's vectors).

    Args:
        model: the model the report was computed on, with no gates or vectors attached.
        vectors: the steering vectors, by a label that names where they come from (built on ``model``).
        kept: the report's trajectories.
        rows_per_vector: how many trajectories each vector shows (half with its highest mean projection, half its lowest).
        chunk_size: trajectories per forward pass.
        progress: show a progress bar.
    """
    directions: dict[str, tuple[SteeringVectors, str, torch.Tensor]] = {}
    for label, steering in vectors.items():
        for site_name in steering.sites:
            vector = steering.vector(site_name).detach().float().cpu()
            norm = float(vector.norm())
            if norm == 0 or not math.isfinite(norm):
                raise ValueError(f"The steering vector {label} at {site_name} is zero or not finite: it has no direction to project on")
            directions[f"{label} @ {site_name}"] = (steering, site_name, vector / norm)
    sites = {steering.sites[site_name].name: steering.sites[site_name] for steering, site_name, _ in directions.values()}
    buckets = [reasoning_buckets(len(row["completion_ids"]), row["reasoning_tokens"]) for row in kept.rows]
    projected: dict[str, list[torch.Tensor]] = {name: [torch.empty(0)] * len(kept) for name in directions}
    chunks = list(kept.trajectories().chunks(chunk_size))
    with torch.no_grad():
        for rows, chunk in tqdm(chunks, desc="explorer: vector projections", disable=None if progress else True, leave=False):
            captured, _ = component_activations(model, list(sites.values()), chunk, read=whole_activation)
            start = max(len(ids) for ids in chunk.prompt_ids)  # completions start after the left-padded prompts
            for name, (_, site_name, unit) in directions.items():
                values = captured[site_name].cpu() @ unit
                for offset, row in enumerate(rows):
                    projected[name][row] = values[offset, start : start + len(chunk.completion_ids[offset])]
    return {
        name: _summarise(name, steering, site_name, projected[name], kept, buckets, rows_per_vector)
        for name, (steering, site_name, _) in directions.items()
    }


def _summarise(
    name: str,
    steering: SteeringVectors,
    site_name: str,
    projections: Sequence[torch.Tensor],
    kept: KeptTrajectories,
    buckets: Sequence[torch.Tensor],
    rows_per_vector: int,
) -> VectorTrace:
    """A vector's trace from its per-token projections on every kept trajectory."""
    tokens = torch.cat(list(projections)).double()
    center = float(tokens.mean()) if len(tokens) else 0.0
    means = torch.tensor([float(values.double().mean()) if len(values) else center for values in projections], dtype=torch.float64)
    sums = torch.zeros(BUCKETS, dtype=torch.float64)
    counts = torch.zeros(BUCKETS, dtype=torch.float64)
    for values, bucket in zip(projections, buckets, strict=True):
        sums.index_add_(0, bucket, values.double() - center)
        counts.index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
    rewards = torch.tensor([float(row["reward"]) for row in kept.rows], dtype=torch.float64)
    lengths = torch.tensor([float(row["reasoning_tokens"]) for row in kept.rows], dtype=torch.float64)
    right = [row for row, record in enumerate(kept.rows) if record["correct"] is True]
    wrong = [row for row, record in enumerate(kept.rows) if record["correct"] is False]
    order = means.argsort(descending=True).tolist()
    highest = order[: (rows_per_vector + 1) // 2]
    lowest = [row for row in reversed(order) if row not in highest][: rows_per_vector - len(highest)]
    rows = highest + lowest
    return VectorTrace(
        name=name,
        site=site_name,
        alpha=steering.alpha,
        norm=float(steering.vector(site_name).detach().float().norm()),
        positions=steering.positions,
        provenance=dict(steering.provenance),
        center=center,
        trajectory_means=means.tolist(),
        bucket_means=(sums / counts.clamp(min=1)).tolist(),
        correlations={"reward": pearson(means, rewards), "reasoning_tokens": pearson(means, lengths)},
        right_mean=float(means[right].mean()) if right else None,
        wrong_mean=float(means[wrong].mean()) if wrong else None,
        rows=rows,
        highest=len(highest),
        projections=[projections[row].tolist() for row in rows],
    )


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The Pearson correlation of two equally long series, or None where either is constant (or shorter than 2)."""
    if len(x) < 2:
        return None
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = float(x.norm() * y.norm())
    return float((x * y).sum()) / scale if scale > 0 else None
