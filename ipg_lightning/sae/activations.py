"""A site's activations and the model's next-token losses in one teacher-forced pass, optionally with
the activation replaced (by an SAE's reconstruction): what training and measuring an SAE read."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ipg_lightning.model.hooks import hook_site
from ipg_lightning.model.sites import Site, unwrap_model
from ipg_lightning.rollout.trajectories import Trajectories


class SitePass(NamedTuple):
    """What one pass read.

    Args:
        activations: the site's activation at every real token, (tokens, width), float32.
        losses: next-token cross-entropies, (rows, seq - 1).
        counted: which of those losses count (real next tokens; only completions if asked).
    """

    activations: torch.Tensor
    losses: torch.Tensor
    counted: torch.Tensor


@torch.no_grad()
def site_pass(
    model: nn.Module,
    site: Site,
    trajectories: Trajectories,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    completions_only: bool = False,
) -> SitePass:
    """Teacher-force ``trajectories``, reading the output of ``site``'s module (and continuing from ``replace(it)`` if given)."""
    device = next(unwrap_model(model).parameters()).device
    batch = {key: value.to(device) for key, value in trajectories.padded().items()}
    completion_mask = batch.pop("completion_mask").bool()
    seen: list[torch.Tensor] = []

    def read(value: torch.Tensor) -> torch.Tensor | None:
        seen.append(value)
        return None if replace is None else replace(value).to(value.dtype)

    handle = hook_site(model, site, read)
    try:
        logits = model(**batch, use_cache=False).logits
    finally:
        handle.remove()
    mask = batch["attention_mask"].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten(), reduction="none")
    targets = completion_mask if completions_only else mask
    return SitePass(seen[-1][mask].float(), losses.view(logits.shape[0], -1), mask[:, :-1] & targets[:, 1:])
