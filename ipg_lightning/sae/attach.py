"""Splicing SAEs into a model: after :func:`attach_sae`, its features are ``sae_feature`` sites.

The model carries its SAEs (off the module tree, see :func:`~ipg_lightning.autoencoder.attached_saes`);
discovering ``sae_feature`` sites, gating them, attributing and steering them then work like any
other family. An attached SAE changes nothing until a gate on its features differs from 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ipg_lightning.autoencoder import SparseAutoencoder, attached_saes
from ipg_lightning.sae.formats import load_sae
from ipg_lightning.sites import ArchitectureSpec, discover_sites, parse_site_name, sae_site_name, unwrap_model


def attach_sae(model: nn.Module, sae: SparseAutoencoder | str | Path, architecture: ArchitectureSpec | None = None) -> str:
    """Splice ``sae`` (or the SAE saved at that path, in any supported format) into ``model``; return its site name.

    The SAE is frozen and moved to the model's device and dtype. Raises ``ValueError`` naming the
    problem when the model has no such hook point, its width differs, or another SAE sits there.
    """
    root = unwrap_model(model)
    if not isinstance(sae, SparseAutoencoder):
        sae = load_sae(sae)
    name = sae_site_name(sae.hook_name)
    saes = attached_saes(root)
    present = saes.get(name)
    if present is not None and sae.source is not None and present.source == sae.source:
        return name
    if saes.get(name, sae) is not sae:
        raise ValueError(f"Another SAE is attached at {name} already; detach it first (ipg_lightning.sae.detach_saes)")
    parameter = next(root.parameters())
    sae.requires_grad_(False).to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
    saes[name] = sae
    try:
        discover_sites(root, ["sae_feature"], [parse_site_name(name.removesuffix(".sae"))[1]], architecture)
    except Exception:
        del saes[name]
        raise
    return name


def attach_saes(model: nn.Module, saes: Iterable[SparseAutoencoder | str | Path], architecture: ArchitectureSpec | None = None) -> list[str]:
    """Attach several SAEs (paths or modules); an SAE already attached at the same point by the same path is skipped."""
    return [attach_sae(model, sae, architecture) for sae in saes]


def detach_saes(model: nn.Module) -> None:
    """Remove every SAE spliced into ``model`` (gates on their features must be detached first)."""
    attached_saes(unwrap_model(model)).clear()
