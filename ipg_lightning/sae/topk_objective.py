"""The TopK SAE's training objective (Gao et al., 2024), as functions of the SAE and a batch of activations.

- :func:`initialise_from_activations`: the input scale that makes the mean norm sqrt(d_in), ``b_dec``
  at the activations' mean, random unit decoder rows and the encoder as their transpose;
- :func:`topk_losses`: the normalised reconstruction loss and the auxiliary loss (AuxK) through which
  dead features reconstruct the residual error;
- :func:`project_decoder_gradient` and :func:`renormalise_decoder`: decoder rows stay at unit norm.

:class:`~ipg_lightning.sae.training.SAETraining` runs them under the Lightning Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ipg_lightning.model.autoencoder import SparseAutoencoder

#: Averages a statistic over data-parallel ranks (``strategy.reduce``), or returns it on one process.
Reduce = Callable[..., torch.Tensor]


@torch.no_grad()
def initialise_from_activations(sae: SparseAutoencoder, activations: torch.Tensor, seed: int, reduce: Reduce) -> None:
    """Set the input scale, ``b_dec``, the decoder and the encoder from (tokens, d_in) ``activations``."""
    mean_norm = reduce(activations.norm(dim=-1).mean(), reduce_op="mean")
    sae.input_scale = float(math.sqrt(sae.d_in) / mean_norm.clamp(min=1e-12))
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.nn.functional.normalize(torch.randn(sae.d_sae, sae.d_in, generator=generator), dim=-1)
    sae.W_dec.copy_(decoder)
    sae.W_enc.copy_(decoder.T)
    sae.b_enc.zero_()
    sae.b_dec.copy_(reduce(activations.mean(0) * sae.input_scale, reduce_op="mean"))


def topk_losses(sae: SparseAutoencoder, activations: torch.Tensor, dead: torch.Tensor, aux_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction loss, auxiliary loss, features) on (tokens, d_in) activations, in the scaled space.

    Both losses are squared errors over the variance of what they reconstruct (the activations, or
    the residual error for the auxiliary loss); ``dead`` marks the features the auxiliary loss may
    use, at most ``aux_k`` per token.
    """
    x = activations * sae.input_scale
    pre = sae.pre_activations(activations)
    features = sae.activate(pre)
    reconstruction = features @ sae.W_dec + sae.b_dec
    loss = (x - reconstruction).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
    aux = torch.zeros((), device=x.device)
    if dead.any():
        error = (x - reconstruction).detach()
        values, indices = pre.masked_fill(~dead, -torch.inf).topk(min(aux_k, int(dead.sum())), dim=-1)
        revived = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        aux = (error - revived @ sae.W_dec).pow(2).sum() / (error - error.mean(0)).pow(2).sum().clamp(min=1e-12)
    return loss, aux, features


def project_decoder_gradient(sae: SparseAutoencoder) -> None:
    """Remove each decoder row's gradient component along the row (the step keeps unit norm to first order)."""
    weight = sae.W_dec
    if weight.grad is not None:
        weight.grad -= (weight.grad * weight).sum(-1, keepdim=True) * weight


@torch.no_grad()
def renormalise_decoder(sae: SparseAutoencoder) -> None:
    """Put the decoder rows back at unit norm."""
    sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_dec, dim=-1))
