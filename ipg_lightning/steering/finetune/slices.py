"""Component-slice fine-tuning: train only the weights that belong to the selected components.

The most local fine-tune there is. Each selected component owns slices of its sub-layer's projections
(``docs/method.md`` section 7):

- MLP neuron ``i``: row ``i`` of every projection that computes the MLP's hidden layer (both halves
  of a fused gate/up projection) and its bias, and column ``i`` of the down-projection;
- attention head ``h``: its rows of the query projection (and of a fused query/key/value one), its
  columns of the output projection, and the key and value rows of its group only when every head
  that shares them (grouped-query attention) is selected, since training them would change the others;
- residual coordinate ``i`` of block ``L``: row ``i`` (and bias) of the two out-projections that write
  into that block's output;
- a whole sub-layer (``attn_out``, ``mlp_out``): every weight of its projections.

A slice is trained as a delta added to the frozen weight through a ``torch.nn.utils.parametrize``
parametrization, so every other weight stays bit-identical, the checkpoint holds only the deltas
(kilobytes), and :func:`merge_weight_slices` writes exactly the weight the model computed with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ipg_lightning.gates.component_gates import parse_component_name
from ipg_lightning.model.discovery import is_conv1d
from ipg_lightning.model.families import SLICE_FAMILIES, ArchitectureSpec
from ipg_lightning.model.hooks import hook_site
from ipg_lightning.model.sites import Site, find_site, projection_shape, resolve_architecture, unwrap_model
from ipg_lightning.steering.finetune.placement import component_hosts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSlice:
    """Indices along one axis of one weight tensor that are trained.

    Args:
        module: dotted path of the projection (from the unwrapped model).
        tensor: ``weight`` or ``bias``.
        dim: the axis of the tensor the indices run along.
        indices: the trained rows (``dim`` 0) or columns (``dim`` 1), sorted.
    """

    module: str
    tensor: str
    dim: int
    indices: tuple[int, ...]


class SliceDelta(nn.Module):
    """The parametrization ``W -> W`` with ``delta`` added to the slices at ``indices`` along ``dim`` (computed in float32)."""

    def __init__(self, dim: int, indices: Sequence[int], shape: Sequence[int]) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long), persistent=False)
        delta_shape = list(shape)
        delta_shape[dim] = len(indices)
        self.delta = nn.Parameter(torch.zeros(delta_shape))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with its slices moved by ``delta`` (unchanged while disabled, see :func:`slices_disabled`)."""
        if not self.enabled:
            return weight
        indices = self.indices.to(weight.device)
        moved = weight.index_select(self.dim, indices).float() + self.delta.to(weight.device)
        return weight.index_copy(self.dim, indices, moved.to(weight.dtype))


def _axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of a projection's weight: Linear stores (out, in), Conv1D (in, out)."""
    return (1, 0) if is_conv1d(module) else (0, 1)


class _Slices:
    """Collects (module, tensor, dim) -> indices, then one :class:`WeightSlice` each."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.indices: dict[tuple[str, str, int], set[int]] = {}
        self.wholes: set[str] = set()

    def add(self, path: str, tensor: str, dim: int, indices: Sequence[int]) -> None:
        self.indices.setdefault((path, tensor, dim), set()).update(indices)

    def outputs(self, path: str, indices: Sequence[int]) -> None:
        """Output channels ``indices`` of a projection: its weight rows (columns for Conv1D) and bias entries."""
        module = self.root.get_submodule(path)
        self.add(path, "weight", _axes(module)[0], indices)
        if getattr(module, "bias", None) is not None:
            self.add(path, "bias", 0, indices)

    def inputs(self, path: str, indices: Sequence[int]) -> None:
        """Input channels ``indices`` of a projection (its weight columns, rows for Conv1D)."""
        self.add(path, "weight", _axes(self.root.get_submodule(path))[1], indices)

    def whole(self, path: str) -> None:
        """Every weight (and bias) entry of a projection (then its other slices are dropped: they lie inside)."""
        self.wholes.add(path)
        self.outputs(path, range(projection_shape(self.root.get_submodule(path))[1]))

    def result(self) -> list[WeightSlice]:
        """One slice per weight tensor and axis; a whole projection's tensors only along its output axis."""
        slices = []
        for (path, tensor, dim), found in self.indices.items():
            if path in self.wholes and tensor == "weight" and dim != _axes(self.root.get_submodule(path))[0]:
                continue
            slices.append(WeightSlice(path, tensor, dim, tuple(sorted(found))))
        return slices


def _candidate_rows(outputs: int, count: int, width: int, units: list[int]) -> list[list[int]]:
    """The layouts a projection with ``outputs`` channels may have over ``count`` units of ``width`` channels (MLP
    neurons: width 1; heads: head_dim), as the rows that belong to ``units``; keys and values shared by a group
    of units belong to it only when the whole group is selected.

    Plain (``count * width`` outputs), grouped (fewer: keys or values), and fused (more: gate/up, or
    queries/keys/values), stacked by part or interleaved by unit or group.
    """

    def rows(chosen: list[int], offset: int = 0, stride: int = width) -> list[int]:
        return [offset + unit * stride + j for unit in chosen for j in range(width)]

    def whole_groups(groups: int) -> list[int]:
        per_group = count // groups
        return [g for g in range(groups) if all(u in units for u in range(g * per_group, (g + 1) * per_group))]

    total = count * width
    if outputs == total:
        return [rows(units)]
    if outputs < total and outputs % width == 0 and count % (outputs // width) == 0:
        return [rows(whole_groups(outputs // width))]
    layouts = []
    for parts in (2, 3):  # fused gate/up, or queries/keys/values without grouping
        if outputs == parts * total:
            stacked = [row for part in range(parts) for row in rows(units, part * total)]
            interleaved = [row for part in range(parts) for row in rows(units, part * width, parts * width)]
            layouts += [stacked, interleaved]
    groups, rest = divmod(outputs - total, 2 * width)
    if outputs > total and not rest and groups and count % groups == 0 and groups < count:  # fused queries, grouped keys/values
        per_group, full = count // groups, whole_groups(groups)
        layouts.append(rows(units) + rows(full, total) + rows(full, total + groups * width))  # q | k | v
        stride = (per_group + 2) * width  # per group: its queries, then its key and value
        interleaved = [g * stride + (u - g * per_group) * width + j for u in units for g in [u // per_group] for j in range(width)]
        interleaved += [g * stride + (per_group + part) * width + j for g in full for part in (0, 1) for j in range(width)]
        layouts.append(interleaved)
    return layouts


class _LocalityProbe:
    """Runs a few tokens through the model to check that a candidate slice changes only its own units."""

    def __init__(self, root: nn.Module, site: Site, units: list[int]) -> None:
        self.root, self.site = root, site
        vocab = getattr(root.config, "vocab_size", 8) or 8
        device = next(root.parameters()).device
        self.ids = (torch.arange(4, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
        self.own = site.channel_gates(unit_mask(site, units)).bool()  # the input channels of the selected units
        self.reference = self._site_input()
        # Exact comparison where the forward pass is deterministic (the CPU); else within its own run-to-run noise.
        self.noise = (self._site_input() - self.reference).abs().max().item()

    @torch.no_grad()
    def _site_input(self) -> torch.Tensor:
        captured = []
        handle = hook_site(self.root, self.site, captured.append)
        try:
            self.root(self.ids)
        finally:
            handle.remove()
        return captured[0].clone()

    def is_local(self, path: str, rows: list[int]) -> bool:
        """Whether moving ``rows`` of the projection at ``path`` moves the selected units' input to the site, and
        leaves every other unit's unchanged."""
        module = self.root.get_submodule(path)
        probe = SliceDelta(_axes(module)[0], rows, module.weight.shape)
        with torch.no_grad():
            probe.delta.copy_(torch.randn(probe.delta.shape, generator=torch.Generator().manual_seed(0)))
        parametrize.register_parametrization(module, "weight", probe.to(module.weight.device))
        try:
            change = (self._site_input() - self.reference).abs()
        finally:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        own = self.own.to(change.device)
        others = change[..., ~own]  # empty when every unit of the site is selected
        return bool((others.numel() == 0 or others.max() <= self.noise) and change[..., own].max() > self.noise)


def _unit_slices(slices: _Slices, site: Site, units: list[int], projections: list[str]) -> None:
    """The site's input columns of ``units`` (heads or neurons), and their rows of the sub-layer's other projections.

    Each projection's layout is chosen among the candidates by a probe that moves the rows and checks
    that no other unit's input changes; a projection where no layout is local (a norm over all heads'
    queries, as in OLMo 2) is left frozen.
    """
    slices.inputs(site.module_path, site.channel_gates(unit_mask(site, units)).nonzero().flatten().tolist())
    probe = _LocalityProbe(slices.root, site, units)
    for path in projections:
        if path == site.module_path:
            continue
        outputs = projection_shape(slices.root.get_submodule(path))[1]
        candidates = _candidate_rows(outputs, site.size, site.head_dim, units)
        if candidates and not candidates[0]:
            continue  # keys or values of groups that are not wholly selected
        local = next((rows for rows in candidates if probe.is_local(path, rows)), None)
        if local is None:
            log.warning("%s: no rows of %s (%d outputs) belong to units %s alone; it stays frozen", site.name, path, outputs, units)
            continue
        slices.outputs(path, local)


def unit_mask(site: Site, units: Sequence[int]) -> torch.Tensor:
    """A 0/1 vector over the site's components, 1 at ``units``."""
    mask = torch.zeros(site.size)
    mask[list(units)] = 1.0
    return mask


def component_slices(model: nn.Module, components: Sequence[str], architecture: ArchitectureSpec | None = None) -> list[WeightSlice]:
    """The weight slices that belong to ``components`` (see the module docstring), one per weight tensor and axis."""
    if not components:
        raise ValueError("Weight-slice fine-tuning needs selected components")
    root, spec = unwrap_model(model), resolve_architecture(model, architecture)
    if sliced_modules(root):
        raise ValueError("The model already carries weight slices: merge them first (merge_weight_slices), or load it afresh")
    by_site: dict[str, list[int]] = {}
    for name in components:
        site_name, index = parse_component_name(name)
        by_site.setdefault(site_name, []).append(index or 0)
    slices = _Slices(root)
    for site_name, indices in by_site.items():
        site = find_site(model, site_name, architecture)
        rule = site.kind.slices
        hosts, fused = component_hosts(root, spec, site) if rule is not None else ([], [])
        dense = site.kind.sublayer != "mlp" or spec.mlp_out_proj is not None  # not a mixture-of-experts MLP
        if rule == "units":
            _unit_slices(slices, site, indices, hosts)
        elif rule == "outputs" and not fused:
            for path in hosts:
                slices.outputs(path, indices)
        elif rule == "whole" and not fused and dense:
            for path in hosts:
                slices.whole(path)
        else:
            raise ValueError(
                f"{site_name}: {site.family} components own no weight slices here (slices exist for {', '.join(SLICE_FAMILIES)}, "
                "outside fused mixture-of-experts weights); train them with gates, or a LoRA adapter (`lora: {placement: target_modules}`)"
            )
    return slices.result()


def attach_weight_slices(model: nn.Module, slices: Sequence[WeightSlice]) -> list[nn.Parameter]:
    """Make the slices trainable (a zero delta each, so the model is unchanged); returns the deltas."""
    root = unwrap_model(model)
    if sliced_modules(root):
        raise ValueError("The model already carries weight slices: merge them first (merge_weight_slices), or load it afresh")
    deltas = []
    for piece in slices:
        module = root.get_submodule(piece.module)
        tensor = getattr(module, piece.tensor)
        delta = SliceDelta(piece.dim, piece.indices, tensor.shape).to(tensor.device)
        parametrize.register_parametrization(module, piece.tensor, delta)
        deltas.append(delta.delta)
    return deltas


@contextmanager
def slices_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes with its original weights (the base of the KL term)."""
    deltas = [module for module in unwrap_model(model).modules() if isinstance(module, SliceDelta)]
    for delta in deltas:
        delta.enabled = False
    try:
        yield
    finally:
        for delta in deltas:
            delta.enabled = True


def sliced_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` (unwrapped paths) that carry trained weight slices."""
    root = unwrap_model(model)
    return [
        name
        for name, module in root.named_modules()
        if parametrize.is_parametrized(module) and any(isinstance(p, SliceDelta) for tensor in module.parametrizations.values() for p in tensor)
    ]


@torch.no_grad()
def merge_weight_slices(model: nn.Module) -> list[str]:
    """Write the trained slices into the weights (exactly the weights the model computed with) and drop the
    parametrizations; returns the modules merged."""
    merged = sliced_modules(model)
    root = unwrap_model(model)
    for name in merged:
        module = root.get_submodule(name)
        for tensor in list(module.parametrizations):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    return merged
