"""Splicing SAEs into a model: after :func:`attach_sae`, its features are ``sae_feature`` sites.

The model carries its SAEs (off the module tree, see :func:`~ipg_lightning.model.autoencoder.attached_saes`);
discovering ``sae_feature`` sites, gating them, attributing and steering them then work like any
other family. An attached SAE changes nothing until a gate on its features differs from 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ipg_lightning.model.autoencoder import SparseAutoencoder, attached_saes
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.sae_splice import splice_sae
from ipg_lightning.model.sites import unwrap_model
from ipg_lightning.sae.formats import load_sae, sae_directory


def attach_sae(model: nn.Module, sae: SparseAutoencoder | str | Path, architecture: ArchitectureSpec | None = None) -> str:
    """Splice ``sae`` (or the SAE saved at that path, in any supported format) into ``model``; return its site name.

    A directory already attached is not read again. Raises ``ValueError`` naming the problem when the
    model has no such hook point, its width differs, or another SAE sits there.
    """
    if not isinstance(sae, SparseAutoencoder):
        source = str(sae_directory(sae).resolve())
        for name, present in attached_saes(unwrap_model(model)).items():
            if present.source == source:
                return name
        sae = load_sae(source)
    return splice_sae(model, sae, architecture)


def attach_saes(model: nn.Module, saes: Iterable[SparseAutoencoder | str | Path], architecture: ArchitectureSpec | None = None) -> list[str]:
    """Attach several SAEs (paths or modules); see :func:`attach_sae`."""
    return [attach_sae(model, sae, architecture) for sae in saes]


def detach_saes(model: nn.Module) -> None:
    """Remove every SAE spliced into ``model`` (gates on their features must be detached first)."""
    attached_saes(unwrap_model(model)).clear()
