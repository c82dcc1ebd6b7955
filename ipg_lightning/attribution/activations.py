"""Per-trajectory activation statistics of gated sites, for the activation-based baselines.

For each trajectory and component, the mean over its generated tokens of the component's
activation: the signed value for residual coordinates and MLP neurons, the L2 norm of the slice
for attention heads, the L2 norm of the output for whole sub-layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from ipg_lightning.model.hooks import site_hooks
from ipg_lightning.model.positions import completion_positions
from ipg_lightning.model.sites import Site, unwrap_model
from ipg_lightning.rollout.trajectories import Trajectories


def check_readable(sites: Sequence[Site], what: str) -> None:
    """Refuse sites whose gates scale fused expert weights: no hook sees an activation there."""
    unreadable = [site.name for site in sites if site.kind.scales_weight]
    if unreadable:
        raise ValueError(f"{what} cannot read {unreadable}: fused expert weights have no activation a hook can see")


#: What is read from a site's (rows, positions, width) float activation: by default its component values.
SiteReading = Callable[[Site, torch.Tensor], torch.Tensor]


def whole_activation(site: Site, activation: torch.Tensor) -> torch.Tensor:
    """A :data:`SiteReading` that keeps the whole (rows, positions, width) activation (what steering vectors are added to)."""
    return activation


@torch.no_grad()
def component_activations(
    model: nn.Module, sites: Sequence[Site], trajectories: Trajectories, read: SiteReading = Site.component_values
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass over ``trajectories``: per site a (rows, positions, size) float tensor of component
    values at every position (see :meth:`~ipg_lightning.model.sites.Site.component_values`; ``read`` can
    read something else, e.g. the whole activation vector), and the (rows, positions) completion mask.
    Positions are those of ``trajectories.padded()``."""
    root = unwrap_model(model)
    device = next(root.parameters()).device
    batch = {k: v.to(device) for k, v in trajectories.padded().items()}
    mask = batch.pop("completion_mask")
    captured: dict[str, torch.Tensor] = {}

    def record(site: Site, value: torch.Tensor) -> None:
        if value.dim() == 2:  # a shared expert sees the tokens flattened (rows x positions, width)
            value = value.view(*mask.shape, -1)
        captured[site.name] = read(site, value.float())

    with site_hooks(root, [(site, partial(record, site)) for site in sites]), completion_positions(mask):
        model(**batch, use_cache=False)
    return captured, mask


@torch.no_grad()
def mean_completion_activations(
    model: nn.Module, sites: Sequence[Site], trajectories: Trajectories, chunk_size: int = 8, read: SiteReading = Site.component_values
) -> dict[str, torch.Tensor]:
    """For each site, a (rows, size) tensor: mean component value (or what ``read`` reads) over each row's generated tokens."""
    check_readable(sites, "Activation baselines")
    results: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
    for _, chunk in trajectories.chunks(chunk_size):
        captured, mask = component_activations(model, sites, chunk, read)
        mask = mask.float()
        tokens = mask.sum(1, keepdim=True).clamp(min=1)
        for site in sites:
            results[site.name].append((captured[site.name] * mask[..., None]).sum(1) / tokens)
    return {name: torch.cat(parts).cpu() for name, parts in results.items()}
