"""Splicing a sparse autoencoder into a model, so that its features become ``sae_feature`` sites."""

from __future__ import annotations

import torch
from torch import nn

from ipg_lightning.model.autoencoder import SparseAutoencoder, attached_saes
from ipg_lightning.model.families import ArchitectureSpec, sae_point
from ipg_lightning.model.sites import discover_sites, unwrap_model


def splice_sae(model: nn.Module, sae: SparseAutoencoder, architecture: ArchitectureSpec | None = None) -> str:
    """Splice ``sae`` into ``model`` at its hook point (its features become ``sae_feature`` sites); return the site name.

    The SAE is frozen and moved to the model's device (it keeps its own dtype: ``encode`` casts the
    activation to it). Splicing the same SAE (or one loaded from the same directory) again does
    nothing. Raises ``ValueError`` naming the problem when the model has no such hook point, its
    width differs, another SAE sits there, or its weights hold NaN or inf; a refused SAE is not left attached.
    """
    root = unwrap_model(model)
    where = sae_point(sae.hook_name)
    saes = attached_saes(root)
    present = saes.get(where.site_name)
    if present is sae or (present is not None and sae.source is not None and present.source == sae.source):
        return where.site_name
    if present is not None:
        raise ValueError(f"Another SAE is attached at {where.site_name} already; detach it first (ipg_lightning.sae.detach_saes)")
    damaged = [name for name, tensor in sae.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if damaged:  # 0 x NaN is NaN: such an SAE would break the model even with every gate at 1
        raise ValueError(f"The SAE {sae.source or 'given'} at {where.site_name} holds non-finite values (NaN or inf) in {damaged}; use another")
    saes[where.site_name] = sae
    try:
        discover_sites(root, ["sae_feature"], [where.layer], architecture)
    except ValueError as error:
        del saes[where.site_name]
        raise ValueError(f"The SAE {sae.source or 'given'} reads {sae.hook_name}, which this model cannot host: {error}") from None
    except Exception:
        del saes[where.site_name]
        raise
    sae.requires_grad_(False).to(device=next(root.parameters()).device)
    return where.site_name
