"""The site families and decoder layouts: the one table a family's behaviour is read from.

Each site family is one entry of :data:`FAMILIES` (a :class:`SiteFamily`): its report name, which
sub-layer holds it, and whether its gate scales a projection's input channels or a module's output.
Everything else (the edit, folding, activation values, where a fine-tune goes) follows from those
fields. :class:`ArchitectureSpec` says where a decoder's gated modules live, where discovery
(:mod:`~ipg_lightning.model.discovery`) cannot decide; :class:`SAEPoint` says where an SAE is spliced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: Which weights host a family's components (see :class:`SiteFamily`).
Hosts = Literal["block_writers", "sublayer", "shared_expert", "sae_point", "gated_weights"]
#: Which slices of its host weights a component owns (see :class:`SiteFamily`).
SliceRule = Literal["units", "outputs", "whole"]


@dataclass(frozen=True)
class SiteFamily:
    """One kind of site.

    Args:
        name: the family's name in recipes and reports (``mlp_neuron``).
        hook_name: its TransformerLens-style site name, with ``{layer}``.
        sublayer: ``attn`` or ``mlp`` for a site inside that sub-layer; None for the block output.
        hooks_input: the gate scales the input channels of the sub-layer's output projection (one
            gate per channel, or per head with ``per_head``); otherwise it scales a module's whole output.
        per_head: one gate per attention head (a slice of ``head_dim`` channels).
        scales_weight: the gate scales fused expert weights instead of an activation
            (:mod:`ipg_lightning.model.experts`); ``per_expert`` then says one site per expert (its hidden
            channels) rather than one gate per whole expert.
        per_expert: one site per expert.
        shared_expert: the site is on a mixture-of-experts MLP's shared expert.
        sae: the components are the features of a sparse autoencoder spliced in at a whole-output
            site (``point``: ``hook_resid_post``, ``hook_mlp_out`` or ``hook_attn_out``).
        hosts: which weights host a component, where a localized LoRA adapter goes (:data:`HOSTS`):
            ``block_writers`` (the out-projections writing into the block's output), ``sublayer`` (every
            projection of its sub-layer, and a mixture of experts' fused weights), ``shared_expert`` (the
            shared expert's projections), ``sae_point`` (what hosts the activation the SAE reads), or
            ``gated_weights`` (none: the gate scales the weights an adapter would wrap).
        slices: which slices of the host weights a component owns for weight-slice fine-tuning
            (:data:`SLICE_RULES`): ``units`` (its own rows and columns), ``outputs`` (its output row of every
            host), ``whole`` (every host weight), or None (no slices).
    """

    name: str
    hook_name: str
    sublayer: str | None
    hooks_input: bool
    per_head: bool = False
    scales_weight: bool = False
    per_expert: bool = False
    shared_expert: bool = False
    sae: bool = False
    hosts: Hosts = "sublayer"
    slices: SliceRule | None = None


#: Every site family by name: the one place a family's behaviour is declared.
FAMILIES: dict[str, SiteFamily] = {
    family.name: family
    for family in (
        SiteFamily("resid_post", "blocks.{layer}.hook_resid_post", None, hooks_input=False, hosts="block_writers", slices="outputs"),
        SiteFamily("mlp_neuron", "blocks.{layer}.mlp.hook_post", "mlp", hooks_input=True, slices="units"),
        SiteFamily("attn_head", "blocks.{layer}.attn.hook_z", "attn", hooks_input=True, per_head=True, slices="units"),
        SiteFamily("attn_out", "blocks.{layer}.hook_attn_out", "attn", hooks_input=False, slices="whole"),
        SiteFamily("mlp_out", "blocks.{layer}.hook_mlp_out", "mlp", hooks_input=False, slices="whole"),
        SiteFamily(
            "expert_neuron", "blocks.{layer}.mlp.experts.{expert}.hook_post", "mlp", False, scales_weight=True, per_expert=True, hosts="gated_weights"
        ),
        SiteFamily("expert", "blocks.{layer}.mlp.hook_expert", "mlp", hooks_input=False, scales_weight=True, hosts="gated_weights"),
        SiteFamily(
            "shared_expert_neuron",
            "blocks.{layer}.mlp.shared_expert.hook_post",
            "mlp",
            True,
            shared_expert=True,
            hosts="shared_expert",
            slices="units",
        ),
        SiteFamily("shared_expert", "blocks.{layer}.mlp.hook_shared_expert_out", "mlp", hooks_input=False, shared_expert=True, hosts="shared_expert"),
        SiteFamily("sae_feature", "blocks.{layer}.{point}.sae", None, hooks_input=False, sae=True, hosts="sae_point"),
    )
}
#: Every site family name, as the type the command line validates against.
SiteFamilyName = Literal[tuple(FAMILIES)]  # noqa: UP007 (built from the table)
#: The families every dense decoder has (a mixture-of-experts MLP has no ``mlp_neuron`` sites).
SITE_FAMILIES: tuple[str, ...] = tuple(name for name, kind in FAMILIES.items() if not (kind.scales_weight or kind.shared_expert or kind.sae))
#: The families of mixture-of-experts MLPs (``shared_expert*`` only where a shared expert exists).
EXPERT_SITE_FAMILIES: tuple[str, ...] = tuple(name for name, kind in FAMILIES.items() if kind.scales_weight or kind.shared_expert)
#: The families whose components own weight slices.
SLICE_FAMILIES: tuple[str, ...] = tuple(name for name, kind in FAMILIES.items() if kind.slices is not None)
#: Where an SAE can be spliced in: its hook point's family (each is a sub-layer's or the block's whole output).
SAE_POINTS: dict[str, str] = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out"}


@dataclass(frozen=True)
class ExpertLayout:
    """Where the fused experts of one block live.

    Args:
        path: dotted path, inside one block, of the module holding the experts' weights.
        parameter: name of its down-projection parameter, shape (experts, ..., ...).
        input_axis: the axis of that parameter that runs over an expert's hidden channels (1 or 2).
        count: number of experts.
        width: hidden channels per expert (the down-projection's inputs).
        bias: name of the per-expert down-projection bias (experts, hidden), if any.
    """

    path: str
    parameter: str
    input_axis: int
    count: int
    width: int
    bias: str | None = None


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the gated modules of one decoder architecture live.

    Args:
        layers: dotted path from the model root to the list of decoder blocks.
        attn_out_proj: dotted path, inside one block, to the attention output projection.
        mlp_out_proj: dotted path, inside one block, to the MLP down-projection; None for a
            mixture-of-experts MLP, which has one per expert (see ``mlp_block``).
        attn_out_norm: a norm applied to the attention output before the residual add (Gemma 2/3,
            OLMo 2), if any: the ``attn_out`` gate then scales that norm's output.
        mlp_out_norm: the same for the MLP output.
        mlp_block: the MLP module itself, where its output is the MLP's contribution and there is no
            single down-projection (a mixture of experts): ``mlp_out`` gates its output.
        experts: the fused experts of a mixture-of-experts MLP.
        shared_expert_proj: the down-projection of a shared expert (Qwen2-MoE), inside one block.

    Example (a config entry for an architecture that is not built in)::

        architecture: {layers: model.layers, attn_out_proj: self_attn.o_proj,
                       mlp_out_proj: mlp.down_proj}
    """

    layers: str
    attn_out_proj: str
    mlp_out_proj: str | None
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    mlp_block: str | None = None
    experts: ExpertLayout | None = None
    shared_expert_proj: str | None = None


#: Module layouts by ``config.model_type`` for the architectures where discovery cannot decide;
#: every other model's layout is discovered (:func:`~ipg_lightning.model.discovery.discover_layout`).
ARCHITECTURES: dict[str, ArchitectureSpec] = {}


class UnsupportedArchitectureError(ValueError):
    """Raised when a model's layout can neither be discovered nor was declared."""


@dataclass(frozen=True)
class SAEPoint:
    """Where an SAE is spliced: the block and the whole-output point whose activation it reads.

    Args:
        layer: the block.
        point: ``hook_resid_post``, ``hook_mlp_out`` or ``hook_attn_out``.
    """

    layer: int
    point: str

    @property
    def activation_name(self) -> str:
        """The activation it reads, e.g. ``blocks.3.hook_resid_post``."""
        return f"blocks.{self.layer}.{self.point}"

    @property
    def site_name(self) -> str:
        """The name of its features' site, e.g. ``blocks.3.hook_resid_post.sae``."""
        return f"{self.activation_name}.sae"


def sae_point(hook_name: str) -> SAEPoint:
    """Where an SAE reading ``hook_name`` is spliced; ``blocks.L.hook_resid_pre`` is block L - 1's output.

    >>> sae_point("blocks.3.hook_resid_pre").site_name
    'blocks.2.hook_resid_post.sae'
    """
    match = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook_name)
    layer, point = (int(match[1]), match[2]) if match else (None, None)
    if point == "hook_resid_pre" and layer:
        layer, point = layer - 1, "hook_resid_post"
    if point not in SAE_POINTS:
        raise ValueError(
            f"An SAE at {hook_name!r} cannot be spliced in: supported hook points are blocks.L.hook_resid_post, "
            "blocks.L.hook_mlp_out, blocks.L.hook_attn_out and blocks.L.hook_resid_pre (L >= 1)"
        )
    return SAEPoint(layer, point)
