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

from ipg_lightning.attribution.activations import component_activations
from ipg_lightning.attribution.kept import KeptTrajectories
from ipg_lightning.explorer.traces import BUCKETS, reasoning_buckets
from ipg_lightning.model.sites import Site
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
        trajectory_means: per kept trajectory (in the report's order), its mean projection over its generated
            tokens (None for a trajectory without any; such trajectories are left out of every summary).
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
    trajectory_means: list[float | None]
    bucket_means: list[float]
    correlations: dict[str, float | None]
    right_mean: float | None
    wrong_mean: float | None
    rows: list[int]
    highest: int
    projections: list[list[float]]


#: A vector to project on: the file's vectors it belongs to, its site, and its unit direction.
Direction = tuple[SteeringVectors, str, torch.Tensor]


def vector_directions(vectors: Mapping[str, SteeringVectors]) -> dict[str, Direction]:
    """Each vector of ``vectors`` (label -> a file's vectors) by its trace name ``LABEL @ SITE``, with its unit
    direction; a zero or non-finite vector is refused in one line (check this before any expensive replay)."""
    directions: dict[str, Direction] = {}
    for label, steering in vectors.items():
        for site_name in steering.sites:
            vector = steering.vector(site_name).detach().float().cpu()
            norm = float(vector.norm())
            if norm == 0 or not math.isfinite(norm):
                raise ValueError(
                    f"The steering vector {label} at {site_name} is zero or not finite, so it has no direction to show: "
                    "leave its file out of vectors, or build the vector again"
                )
            directions[f"{label} @ {site_name}"] = (steering, site_name, vector / norm)
    return directions


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
    directions = vector_directions(vectors)
    sites = {steering.sites[site_name].name: steering.sites[site_name] for steering, site_name, _ in directions.values()}
    names = {site: [name for name, (_, site_name, _) in directions.items() if site_name == site] for site in sites}
    units = {site: torch.stack([directions[name][2] for name in names[site]], dim=1) for site in sites}  # (width, vectors at the site)

    def project(site: Site, activation: torch.Tensor) -> torch.Tensor:  # in the hook: only (rows, positions, k) leaves it
        return activation @ units[site.name].to(activation.device)

    buckets = [reasoning_buckets(len(row["completion_ids"]), row["reasoning_tokens"]) for row in kept.rows]
    projected: dict[str, list[torch.Tensor]] = {name: [torch.empty(0)] * len(kept) for name in directions}
    chunks = list(kept.trajectories().chunks(chunk_size))
    with torch.no_grad():
        for rows, chunk in tqdm(chunks, desc="explorer: vector projections", disable=None if progress else True, leave=False):
            captured, _ = component_activations(model, list(sites.values()), chunk, read=project)
            start = max(len(ids) for ids in chunk.prompt_ids)  # completions start after the left-padded prompts
            for site, values in captured.items():
                values = values.cpu()
                for column, name in enumerate(names[site]):
                    for offset, row in enumerate(rows):
                        projected[name][row] = values[offset, start : start + len(chunk.completion_ids[offset]), column].clone()
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
    """A vector's trace from its per-token projections on every kept trajectory (one without generated tokens has no mean)."""
    tokens = torch.cat(list(projections)).double()
    center = float(tokens.mean()) if len(tokens) else 0.0
    means = [float(values.double().mean()) if len(values) else None for values in projections]
    sums = torch.zeros(BUCKETS, dtype=torch.float64)
    counts = torch.zeros(BUCKETS, dtype=torch.float64)
    for values, bucket in zip(projections, buckets, strict=True):
        sums.index_add_(0, bucket, values.double() - center)
        counts.index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
    measured = [row for row, mean in enumerate(means) if mean is not None]
    series = torch.tensor([means[row] for row in measured], dtype=torch.float64)
    rewards = torch.tensor([float(kept.rows[row]["reward"]) for row in measured], dtype=torch.float64)
    lengths = torch.tensor([float(kept.rows[row]["reasoning_tokens"]) for row in measured], dtype=torch.float64)
    right = [means[row] for row in measured if kept.rows[row]["correct"] is True]
    wrong = [means[row] for row in measured if kept.rows[row]["correct"] is False]
    order = sorted(measured, key=lambda row: means[row], reverse=True)
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
        trajectory_means=means,
        bucket_means=(sums / counts.clamp(min=1)).tolist(),
        correlations={"reward": pearson(series, rewards), "reasoning_tokens": pearson(series, lengths)},
        right_mean=sum(right) / len(right) if right else None,
        wrong_mean=sum(wrong) / len(wrong) if wrong else None,
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
