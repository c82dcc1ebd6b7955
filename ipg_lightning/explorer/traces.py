"""What a component does on the kept trajectories: its activation at every token, and where its score comes from.

Two replays of an attribution's kept trajectories (:mod:`ipg_lightning.attribution.kept`) through
the model, for a chosen set of components:

- **Activations**, at gates = 1: each component's value at every generated token (the signed value
  of a neuron or residual coordinate, the norm of a head's slice or a sub-layer's output, an SAE
  feature's activation). The trajectories where a component peaks highest are the ones shown.
- **Per-token contributions** to the IPG score (``ipg`` and ``grad_x_act`` with fixed estimation
  and full credit). A gate multiplies its component at every position, so the derivative of the
  surrogate by the gate is a sum over positions; giving each position its own copy of the gate
  (``c + delta_t`` with ``delta = 0``) splits it exactly. Integrated along the report's own path with
  its own quadrature and advantage weights, the contributions of one prompt's trajectories add up to
  that prompt's score, and their mean over prompts is the report's score (``docs/method.md``
  section 3).

Positions are bucketed into deciles of each trajectory's reasoning (its tokens before the final
answer) plus one bucket for the answer, to show where in a trace a component fires and counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ipg_lightning.attribution.activations import check_readable, component_activations
from ipg_lightning.attribution.estimator import quadrature, surrogate_weights
from ipg_lightning.attribution.kept import KeptTrajectories
from ipg_lightning.gates.component_gates import parse_component_name
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.hooks import site_hooks
from ipg_lightning.model.sites import Site, unwrap_model
from ipg_lightning.rollout.passes.frozen_prefix import first_live_block
from ipg_lightning.rollout.passes.teacher_forced import TeacherForcedPasses
from ipg_lightning.rollout.scoring import completion_log_probs, frozen_parameters
from ipg_lightning.rollout.trajectories import Trajectories

#: Buckets of a trace: ten deciles of the reasoning, then the answer.
BUCKETS = 11


@dataclass
class ComponentTrace:
    """One component on the kept trajectories.

    Args:
        name: the component, e.g. ``blocks.3.mlp.hook_post[326]``.
        rows: the kept trajectories where it peaks highest (by largest absolute activation over the
            generated tokens), highest first.
        activations: per row of ``rows``, its activation at each generated token.
        contributions: per row of ``rows``, each generated token's contribution to the score, on the
            score's scale (over all kept trajectories and positions they add up to ``score``); None
            where the method has no per-token split.
        prompt_part: per row of ``rows``, the summed contribution of the prompt's positions.
        activation_buckets: share of the absolute activation mass over all kept trajectories in each
            decile of the reasoning, then the answer.
        contribution_buckets: the score split by the same buckets, or None; with ``prompt_contribution``
            (the part of the prompts' positions) they add up to ``score``.
        prompt_contribution: the part of the score that comes from the prompts' positions, or None.
        prompt_scores: the component's score on each kept prompt (their mean is ``score``), or None.
        score: the score recomputed from the per-token contributions, or None.
    """

    name: str
    rows: list[int]
    activations: list[list[float]]
    contributions: list[list[float]] | None = None
    prompt_part: list[float] | None = None
    activation_buckets: list[float] = field(default_factory=list)
    contribution_buckets: list[float] | None = None
    prompt_contribution: float | None = None
    prompt_scores: list[float] | None = None
    score: float | None = None


@dataclass(frozen=True)
class ScorePath:
    """How the report integrated its scores: the quadrature, the baseline, and the sites that moved together.

    Args:
        rule: quadrature rule.
        steps: quadrature points.
        baseline: the gate value c' the path starts from.
        groups: the sites whose gates move together (one per site for ``path: layer``).
        surrogate: how each trajectory's log-likelihood entered the surrogate (``sum`` or ``token_mean``).
    """

    rule: str
    steps: int
    baseline: float
    groups: list[list[str]]
    surrogate: str = "sum"


def reasoning_buckets(completion_tokens: int, reasoning_tokens: int) -> torch.Tensor:
    """Bucket of each generated token: ``floor(10 t / R)`` inside the reasoning's R tokens, 10 after it."""
    positions = torch.arange(completion_tokens)
    reasoning = min(reasoning_tokens, completion_tokens)
    if reasoning <= 0:  # the completion opens with its answer
        return torch.full_like(positions, 10)
    return torch.where(positions < reasoning, (positions * 10) // reasoning, torch.full_like(positions, 10))


def trace_components(
    model: nn.Module,
    sites: dict[str, Site],
    components: Sequence[str],
    kept: KeptTrajectories,
    path: ScorePath | None = None,
    rows_per_component: int = 8,
    chunk_size: int = 8,
    progress: bool = True,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, ComponentTrace]:
    """Replay ``kept`` through ``model`` and trace ``components`` (names at ``sites``).

    Args:
        model: the model the report was computed on (no gates attached).
        sites: the report's sites, rebuilt on ``model`` (every site a path group holds, for ``path``).
        components: the components to trace; their sites must be readable (not fused expert weights).
        kept: the report's trajectories.
        path: how the report integrated (None: activations only, no per-token contributions).
        rows_per_component: how many trajectories to keep per component (where it peaks highest).
        chunk_size: trajectories per forward (and backward) pass.
        progress: show progress bars.
        architecture: module paths of a decoder that is not built in.
    """
    by_site: dict[str, list[int]] = {}
    for name in components:
        site_name, index = parse_component_name(name)
        if site_name not in sites:
            raise ValueError(f"{name} is not a component of the report's sites {list(sites)}")
        if (index or 0) >= sites[site_name].size:
            raise ValueError(f"{name} is out of range: {site_name} has {sites[site_name].size} components")
        by_site.setdefault(site_name, []).append(index or 0)
    traced_sites = [sites[name] for name in by_site]
    check_readable(traced_sites, "The explorer")
    if path is not None and any(row["advantage"] is None for row in kept.rows):
        raise ValueError("Per-token contributions need each trajectory's advantage; these trajectories were kept by a method without one")
    everything = kept.trajectories()
    buckets = [reasoning_buckets(len(row["completion_ids"]), row["reasoning_tokens"]) for row in kept.rows]
    peaks, masses = _activation_summaries(model, traced_sites, by_site, everything, buckets, chunk_size, progress)
    traces = {}
    for site_name, indices in by_site.items():
        for column, index in enumerate(indices):
            name = sites[site_name].component_name(index)
            order = peaks[site_name][:, column].argsort(descending=True)[:rows_per_component].tolist()
            mass = masses[site_name][:, column]
            traces[name] = ComponentTrace(name, order, [], activation_buckets=(mass / mass.sum().clamp(min=1e-30)).tolist())
    shown = sorted({row for trace in traces.values() for row in trace.rows})
    _fill_activations(model, traced_sites, by_site, kept, shown, traces, chunk_size)
    if path is not None:
        _fill_contributions(model, sites, by_site, kept, buckets, shown, traces, path, chunk_size, progress, architecture)
    return traces


def _activation_summaries(
    model: nn.Module,
    traced_sites: list[Site],
    by_site: dict[str, list[int]],
    trajectories: Trajectories,
    buckets: list[torch.Tensor],
    chunk_size: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per site: each row's peak |activation| over generated tokens, and the |activation| mass per bucket."""
    peaks = {site.name: [] for site in traced_sites}
    masses = {site.name: torch.zeros(BUCKETS, len(by_site[site.name])) for site in traced_sites}
    chunks = list(trajectories.chunks(chunk_size))
    for rows, chunk in tqdm(chunks, desc="explorer: activations", disable=None if progress else True, leave=False):
        captured, mask = component_activations(model, traced_sites, chunk)
        for site in traced_sites:
            values = captured[site.name][..., by_site[site.name]].abs().cpu() * mask[..., None].cpu()
            peaks[site.name].append(values.amax(1))
            for offset, row in enumerate(rows):
                generated = _completion_slice(values[offset], chunk, offset)
                masses[site.name].index_add_(0, buckets[row], generated)
    return {name: torch.cat(parts) for name, parts in peaks.items()}, masses


def _prompt_width(chunk: Trajectories) -> int:
    """Where the generated tokens start in a padded chunk (prompts are left-padded to the widest one)."""
    return max(len(ids) for ids in chunk.prompt_ids)


def _completion_slice(values: torch.Tensor, chunk: Trajectories, offset: int) -> torch.Tensor:
    """The generated tokens' entries of one padded row."""
    start = _prompt_width(chunk)
    return values[start : start + len(chunk.completion_ids[offset])]


def _fill_activations(
    model: nn.Module,
    traced_sites: list[Site],
    by_site: dict[str, list[int]],
    kept: KeptTrajectories,
    shown: list[int],
    traces: dict[str, ComponentTrace],
    chunk_size: int,
) -> None:
    """The activation at every generated token of the shown rows, for the components that show them."""
    values: dict[tuple[str, int], list[float]] = {}
    for rows, chunk in kept.trajectories(shown).chunks(chunk_size):
        captured, _ = component_activations(model, traced_sites, chunk)
        for site in traced_sites:
            for offset, position in enumerate(rows):
                generated = _completion_slice(captured[site.name][offset][:, by_site[site.name]].cpu(), chunk, offset)
                for column, index in enumerate(by_site[site.name]):
                    values[(site.component_name(index), shown[position])] = generated[:, column].tolist()
    for trace in traces.values():
        trace.activations = [values[(trace.name, row)] for row in trace.rows]


def _fill_contributions(
    model: nn.Module,
    sites: dict[str, Site],
    by_site: dict[str, list[int]],
    kept: KeptTrajectories,
    buckets: list[torch.Tensor],
    shown: list[int],
    traces: dict[str, ComponentTrace],
    path: ScorePath,
    chunk_size: int,
    progress: bool,
    architecture: ArchitectureSpec | None,
) -> None:
    """Integrate per-position gate gradients along the report's path, for every traced component.

    Everything is on the report's scale (divided by the number of prompts M), except
    ``prompt_scores``, which are per prompt (their mean is the score). Trajectories with a zero
    advantage (their prompt carried no signal) contribute nothing and are not replayed.
    """
    alphas, weights = quadrature(path.rule, path.steps)
    prompts = len(kept.prompts)
    active = [row for row, record in enumerate(kept.rows) if record["advantage"]]
    advantages = torch.tensor([kept.rows[row]["advantage"] for row in active], dtype=torch.float64)
    token_counts = [len(kept.rows[row]["completion_ids"]) for row in active]
    surrogate = surrogate_weights(advantages, token_counts, kept.num_samples, path.surrogate)  # as the attribution weighed them
    trajectories = kept.trajectories(active)
    shown_set = set(shown)
    per_prompt = {name: torch.zeros(prompts, len(indices), dtype=torch.float64) for name, indices in by_site.items()}
    per_bucket = {name: torch.zeros(BUCKETS, len(indices), dtype=torch.float64) for name, indices in by_site.items()}
    lengths = {row: len(kept.rows[row]["completion_ids"]) for row in shown}
    per_token = {name: {row: torch.zeros(lengths[row], len(cols), dtype=torch.float64) for row in shown} for name, cols in by_site.items()}
    prompt_part = {name: {row: torch.zeros(len(cols), dtype=torch.float64) for row in shown} for name, cols in by_site.items()}
    groups = [group for group in path.groups if any(name in by_site for name in group)]
    passes = [(group, alpha, weight) for group in groups for alpha, weight in zip(alphas, weights, strict=True)]
    # the blocks below the lowest moving site are frozen: replayed from the first pass, as attribution does
    first_live_layer = first_live_block(model, [sites[name] for group in groups for name in group], architecture)
    replay = TeacherForcedPasses(model, chunk_size, first_live_layer, reuse_prefix=True, architecture=architecture)
    for group, alpha, weight in tqdm(passes, desc="explorer: per-token contributions", disable=None if progress else True, leave=False):
        gate = path.baseline + alpha * (1 - path.baseline)
        scale = weight * (1 - path.baseline)
        for rows, chunk in replay.chunks(trajectories):
            group_sites = [sites[name] for name in group]
            with replay.run(rows):
                gradients = _position_gradients(model, group_sites, set(by_site), gate, chunk, surrogate[rows.start : rows.stop])
            layout = _chunk_layout(chunk, [active[position] for position in rows], kept, buckets)
            for name, gradient in gradients.items():
                gradient = gradient[..., by_site[name]].double().cpu() * scale
                prompt_sums = gradient[:, : layout.start].sum(1)
                generated = gradient[:, layout.start :]  # zero past each completion's end: those positions predict nothing
                per_prompt[name].index_add_(0, layout.prompts, generated.sum(1) + prompt_sums)
                per_bucket[name] += torch.zeros(BUCKETS + 1, generated.shape[-1], dtype=torch.float64).index_add_(
                    0, layout.buckets.flatten(), generated.reshape(-1, generated.shape[-1])
                )[:BUCKETS]
                for offset, row in enumerate(layout.rows):
                    if row in shown_set:
                        per_token[name][row] += generated[offset, : len(chunk.completion_ids[offset])]
                        prompt_part[name][row] += prompt_sums[offset]
    for site_name, indices in by_site.items():
        for column, index in enumerate(indices):
            trace = traces[sites[site_name].component_name(index)]
            trace.contributions = [(per_token[site_name][row][:, column] / prompts).tolist() for row in trace.rows]
            trace.prompt_part = [float(prompt_part[site_name][row][column]) / prompts for row in trace.rows]
            trace.prompt_scores = per_prompt[site_name][:, column].tolist()
            trace.score = float(per_prompt[site_name][:, column].mean())
            trace.contribution_buckets = (per_bucket[site_name][:, column] / prompts).tolist()
            trace.prompt_contribution = trace.score - sum(trace.contribution_buckets)


@dataclass
class _ChunkLayout:
    """Where a padded chunk's generated tokens start, and each row's kept index, prompt and bucket per position."""

    start: int
    rows: list[int]
    prompts: torch.Tensor
    buckets: torch.Tensor  # (rows, completion width); BUCKETS past a row's end


def _chunk_layout(chunk: Trajectories, rows: list[int], kept: KeptTrajectories, buckets: list[torch.Tensor]) -> _ChunkLayout:
    """The bookkeeping of one chunk of kept rows, vectorised for every pass over it."""
    width = max(len(ids) for ids in chunk.completion_ids)
    positions = torch.full((len(rows), width), BUCKETS, dtype=torch.long)
    for offset, row in enumerate(rows):
        positions[offset, : len(buckets[row])] = buckets[row]
    prompts = torch.tensor([kept.rows[row]["prompt"] for row in rows], dtype=torch.long)
    return _ChunkLayout(_prompt_width(chunk), rows, prompts, positions)


def _position_gradients(
    model: nn.Module, group: list[Site], traced: set[str], gate: float, chunk: Trajectories, weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """d L / d c_t at every position for the traced sites of ``group``, with the group's gates at ``gate``.

    ``L = sum_r weights[r] sum_t log pi(a_t^r)`` over ``chunk`` (the surrogate's weights, :func:`surrogate_weights`). Each traced site's gate becomes
    ``gate + delta`` with a zero ``delta`` of shape (rows, positions, size), whose gradient is the split.
    Sites that see the tokens flattened (a shared expert's input, rows x positions by width) are
    edited in the (rows, positions, width) layout and flattened back.
    """
    root = unwrap_model(model)
    layout = chunk.padded()["input_ids"].shape
    deltas: dict[str, torch.Tensor] = {}

    def edit(site: Site, value: torch.Tensor) -> torch.Tensor:
        flat = value.dim() == 2
        value = value.view(*layout, -1) if flat else value
        vector = torch.full((site.size,), gate, device=value.device)
        if site.name in traced:
            deltas[site.name] = torch.zeros(*layout, site.size, device=value.device, requires_grad=True)
            vector = vector + deltas[site.name]
        edited = site.edit(value, vector)
        return edited.view(-1, edited.shape[-1]) if flat else edited

    with site_hooks(root, [(site, partial(edit, site)) for site in group]), frozen_parameters(model), torch.enable_grad():
        log_probs = completion_log_probs(model, chunk)
        surrogate = (weights.to(log_probs.device) * log_probs.float().sum(-1)).sum()
        names = list(deltas)
        gradients = torch.autograd.grad(surrogate, [deltas[name] for name in names], allow_unused=True)
    return {name: torch.zeros_like(deltas[name]) if g is None else g for name, g in zip(names, gradients, strict=True)}
