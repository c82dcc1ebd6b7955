"""Sparse autoencoders (SAEs) on a model's activations, and the splice that gates their features.

An SAE reads an activation ``z`` (width ``d_in``) at one hook point, e.g. ``blocks.3.hook_resid_post``,
and writes it as a sparse sum of ``d_sae`` learned directions: ``f = encode(z)``,
``z_hat = f @ W_dec + b_dec``. Its features are components like neurons: a gate ``g`` (1 = untouched)
scales each feature, and the model continues from

    z' = decode(g * f) + (z - decode(f)) = z + ((g - 1) * f) @ W_dec  (in the SAE's input scale),

so the SAE's reconstruction error is kept and gates at 1 leave the model exactly unchanged.

The encoder covers the architectures in use: ``relu`` (standard), ``topk`` (the k largest
pre-activations, after a ReLU) and ``jumprelu`` (a pre-activation above its feature's threshold;
BatchTopK SAEs are this at inference, with one threshold shared by all features). Per-token activation normalisation as SAELens
defines it is applied before encoding and undone after decoding. Reading and writing the file formats lives in
:mod:`ipg_lightning.sae`; a model carries the SAEs spliced into it (:func:`attached_saes`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

SAEActivation = Literal["relu", "topk", "jumprelu"]
#: How inputs are normalised before encoding: SAELens' per-token ``normalize_activations``, or this
#: library's ``constant_scale`` (a training-time scale, folded into the weights when saved).
SAENormalization = Literal["none", "constant_scale", "constant_norm_rescale", "layer_norm"]
_ATTACHED = "_ipg_saes"


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder at one hook point of a model; its parameters are frozen unless trained.

    Args:
        d_in: width of the activation it reads.
        d_sae: number of features.
        hook_name: where it reads, as a TransformerLens-style site name (``blocks.3.hook_resid_post``,
            ``blocks.3.hook_mlp_out``, ``blocks.3.hook_attn_out``; ``blocks.L.hook_resid_pre`` is the
            output of block L - 1).
        activation: ``relu``, ``topk`` or ``jumprelu``.
        k: the number of active features of a ``topk`` SAE.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        normalization: ``none``; ``constant_scale`` (inputs multiplied by ``input_scale``, outputs
            divided by it, as while training); ``constant_norm_rescale`` (each token scaled to norm
            sqrt(d_in), outputs scaled back); ``layer_norm`` (each token standardised, outputs
            de-standardised), as SAELens defines them.
        input_scale: the constant of ``constant_scale``.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hook_name: str,
        activation: SAEActivation = "topk",
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        normalization: SAENormalization = "none",
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in SAEActivation.__args__:
            raise ValueError(f"Unknown SAE architecture {activation!r}; supported: {list(SAEActivation.__args__)}")
        if normalization not in SAENormalization.__args__:
            raise ValueError(f"Unknown SAE activation normalisation {normalization!r}; supported: {list(SAENormalization.__args__)}")
        if activation == "topk" and not (k and 0 < k <= d_sae):
            raise ValueError(f"A topk SAE needs k in 1..{d_sae} (its number of features), got {k}")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive number, got {input_scale}")
        self.d_in, self.d_sae, self.hook_name = d_in, d_sae, hook_name
        self.activation, self.k = activation, k
        self.apply_b_dec_to_input, self.normalization, self.input_scale = apply_b_dec_to_input, normalization, float(input_scale)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae), requires_grad=False)
        #: the file or directory it was loaded from, if any (attaching the same one twice is a no-op).
        self.source: str | None = None

    def config(self) -> dict:
        """The constructor arguments (what a file needs besides the weights)."""
        return {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "hook_name": self.hook_name,
            "activation": self.activation,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalization": self.normalization,
            "input_scale": self.input_scale,
        }

    def extra_repr(self) -> str:
        """The hook point, sizes and architecture, for ``print(sae)``."""
        return f"{self.hook_name}, d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation}" + (f", k={self.k}" if self.k else "")

    def _normalise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        """``(x, factor, shift)``: the normalised input ``x``, and the map back from its space, ``v * factor + shift``."""
        if self.normalization == "constant_scale":
            return z * self.input_scale, 1 / self.input_scale, 0.0
        if self.normalization == "constant_norm_rescale":
            scale = math.sqrt(self.d_in) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return z * scale, 1 / scale, 0.0
        if self.normalization == "layer_norm":  # SAELens: unbiased std, eps on the way in only
            mean = z.mean(dim=-1, keepdim=True)
            std = (z - mean).std(dim=-1, keepdim=True)
            return (z - mean) / (std + 1e-5), std, mean
        return z, 1.0, 0.0

    def pre_activations(self, z: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations ``(normalised z [- b_dec]) @ W_enc + b_enc``."""
        x, _, _ = self._normalise(z)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations, by the SAE's architecture."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "topk":  # the k largest pre-activations, then ReLU; all others 0
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return torch.where(pre > self.threshold, torch.relu(pre), torch.zeros_like(pre))  # jumprelu

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d_in) activations -> (..., d_sae) feature activations; an SAE on another device follows ``z``."""
        if self.W_enc.device != z.device:  # e.g. a model moved after load_steered spliced its SAE in
            self.to(z.device)
        return self.activate(self.pre_activations(z.to(self.W_enc.dtype)))

    def decode(self, features: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_sae) features -> (..., d_in) reconstruction; ``z`` is the input, which per-token normalisations need."""
        if z is None and self.normalization in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(f"Decoding under {self.normalization} normalisation needs the input z")
        _, factor, shift = self._normalise(features.new_zeros(self.d_in) if z is None else z.to(features.dtype))
        return (features @ self.W_dec + self.b_dec) * factor + shift

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(z))``."""
        return self.decode(self.encode(z), z)

    def feature_contributions(self, features: torch.Tensor, weights: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(weights * features) @ W_dec`` mapped back to ``z``'s scale: what those features add to the activation."""
        _, factor, _ = self._normalise(z.to(features.dtype))
        return ((weights * features) @ self.W_dec) * factor

    @torch.no_grad()
    def folded(self) -> SparseAutoencoder:
        """An equal SAE with a ``constant_scale`` folded into its weights (normalisation ``none``); others are returned as is."""
        if self.normalization != "constant_scale":
            return self
        config = {**self.config(), "normalization": "none", "input_scale": 1.0}
        folded = SparseAutoencoder(**config)
        scale = self.input_scale
        folded.W_enc.copy_(self.W_enc * scale)
        folded.b_enc.copy_(self.b_enc)
        folded.W_dec.copy_(self.W_dec / scale)
        folded.b_dec.copy_(self.b_dec / scale)
        folded.threshold.copy_(self.threshold)
        return folded.requires_grad_(False)

    def splice(self, z: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``z`` with each feature scaled by its gate and the reconstruction error kept: ``z + ((g - 1) f) W_dec``.

        Computed in the SAE's dtype and returned in ``z``'s.
        """
        features = self.encode(z)
        change = self.feature_contributions(features, gate.to(features) - 1, z)
        return z + change.to(z.dtype)


def attached_saes(model: nn.Module) -> dict[str, SparseAutoencoder]:
    """The SAEs spliced into ``model`` (a transformers model, not a PEFT wrapper) by hook name.

    They are kept off the module tree, so ``save_pretrained`` and the model's identity never see them.
    """
    return vars(model).setdefault(_ATTACHED, {})


def same_sae(first: SparseAutoencoder | None, second: SparseAutoencoder | None) -> bool:
    """Whether two SAEs (or None) encode and decode alike: the same object, or equal settings and weights."""
    if first is second:
        return True
    if first is None or second is None or first.config() != second.config():
        return False
    return all(
        torch.equal(a.detach().cpu().float(), b.detach().cpu().float())
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
