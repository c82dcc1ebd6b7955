"""Component sites of Hugging Face causal LMs: what can be gated, and where it lives.

A *site* is one place in the network (e.g. the residual stream after block 3); its *components*
are the scalar units there (the coordinates of that residual vector). Where the decoder blocks and
each block's two output projections are is found from the model itself
(:mod:`~ipg_lightning.model.discovery`); :data:`~ipg_lightning.model.families.ARCHITECTURES` overrides
that only where discovery cannot decide, and users can declare an :class:`ArchitectureSpec`. Component
names follow the TransformerLens vocabulary (``blocks.3.hook_resid_post[117]``) so reports compare with
other tools. What a site does follows from its family's entry in :data:`~ipg_lightning.model.families.FAMILIES`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ipg_lightning.model.autoencoder import SparseAutoencoder, attached_saes
from ipg_lightning.model.discovery import DiscoveryError, discover_layout, is_conv1d
from ipg_lightning.model.families import (
    ARCHITECTURES,
    FAMILIES,
    SAE_POINTS,
    ArchitectureSpec,
    SiteFamily,
    UnsupportedArchitectureError,
    sae_point,
)


@dataclass(frozen=True)
class Site:
    """One gated place in the network.

    Args:
        family: which kind of component lives here (one of :data:`SITE_FAMILIES`).
        layer: index of the decoder block.
        module_path: dotted path (from the unwrapped model root) of the module the hook goes on.
        size: number of components (gates) at this site.
        head_dim: width of one head's slice of the projection input (``attn_head`` only).
        foldable: whether the gates fold exactly into the weights of ``module_path`` (a projection);
            residual-stream gates and gates after a norm do not, and travel in a steering file.
        expert: the expert of an ``expert_neuron`` site.
        parameter: for gates that scale fused expert weights, the parameter of ``module_path`` they scale.
        input_axis: the axis of that parameter over an expert's hidden channels.
        bias: the per-expert bias a whole-expert gate also scales.
        point: for SAE features, the hook point the SAE reads (``hook_resid_post``).
        sae: for SAE features, the autoencoder (not part of the site's identity or description).
    """

    family: str
    layer: int
    module_path: str
    size: int
    head_dim: int = 1
    foldable: bool = True
    expert: int | None = None
    parameter: str | None = None
    input_axis: int = 2
    bias: str | None = None
    point: str | None = None
    sae: SparseAutoencoder | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> SiteFamily:
        """The site's family."""
        return FAMILIES[self.family]

    @property
    def name(self) -> str:
        """The site's hook name, e.g. ``blocks.3.hook_resid_post``."""
        return self.kind.hook_name.format(layer=self.layer, expert=self.expert, point=self.point)

    @property
    def hooks_input(self) -> bool:
        """True if the gate scales the module's input (a forward pre-hook), else its output."""
        return self.kind.hooks_input

    def component_name(self, index: int) -> str:
        """Name of one component, e.g. ``blocks.3.attn.hook_z[2]``; scalar sites have no index."""
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name} has {self.size} components, got index {index}")
        return self.name if self.size == 1 else f"{self.name}[{index}]"

    def description(self) -> dict[str, Any]:
        """The site's fields as plain values (for files), without the SAE it may hold."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.name != "sae"}

    def channel_gates(self, gate: torch.Tensor) -> torch.Tensor:
        """``gate`` (..., size) spread over the hooked channels: each head's gate repeated over its slice.

        Leading dimensions broadcast, so a gate per position (batch, seq, size) works too."""
        return gate.repeat_interleave(self.head_dim, dim=-1) if self.head_dim > 1 else gate

    def edit(self, activation: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Scale ``activation`` (batch, seq, width) by ``gate`` (size,) at every position, or by a gate per
        position (batch, seq, size); SAE features are scaled inside the activation's decomposition
        (:meth:`SparseAutoencoder.splice`)."""
        if self.sae is not None:
            return self.sae.splice(activation, gate)
        return activation * self.channel_gates(gate.to(device=activation.device, dtype=activation.dtype))

    def weight_multiplier(self, shape: torch.Size, gate: torch.Tensor) -> torch.Tensor:
        """For a gate on fused expert weights of ``shape`` (experts first): the factor, broadcastable to
        ``shape``, that the weight is multiplied by (differentiable in ``gate``)."""
        if not self.kind.per_expert:  # one gate per whole expert
            return gate.view(-1, *([1] * (len(shape) - 1)))
        factor_shape = [shape[0]] + [1] * (len(shape) - 1)
        factor_shape[self.input_axis] = shape[self.input_axis]
        factor = torch.ones(factor_shape, dtype=gate.dtype, device=gate.device)
        factor[self.expert] = gate.view(factor_shape[1:])
        return factor

    def component_values(self, activation: torch.Tensor) -> torch.Tensor:
        """(batch, seq, width) activation -> (batch, seq, size) per-component values: the signed value of a
        coordinate or neuron, the L2 norm of a head's slice, the L2 norm of a whole sub-layer's output, an
        SAE feature's activation."""
        if self.sae is not None:
            return self.sae.encode(activation)
        if self.kind.per_head:
            return activation.reshape(*activation.shape[:-1], self.size, self.head_dim).norm(dim=-1)
        if self.size == 1:
            return activation.norm(dim=-1, keepdim=True)
        return activation


def edits_block_output(site: Site) -> bool:
    """True if ``site`` edits a decoder block's output (the residual stream), directly or through an SAE there."""
    kind = FAMILIES[SAE_POINTS[site.point]] if site.kind.sae else site.kind
    return kind.sublayer is None


def parse_site_name(site_name: str) -> tuple[str, int]:
    """``blocks.3.attn.hook_z`` -> ``("attn_head", 3)``; raises ``ValueError`` naming unknown names.

    >>> parse_site_name("blocks.12.hook_resid_post")
    ('resid_post', 12)
    """
    for family, kind in FAMILIES.items():
        pattern = re.escape(kind.hook_name).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"\d+")
        pattern = pattern.replace(r"\{point\}", "(?:" + "|".join(SAE_POINTS) + ")")
        match = re.fullmatch(pattern, site_name)
        if match:
            return family, int(match.group("layer"))
    examples = ", ".join(kind.hook_name.format(layer=3, expert=0, point="hook_resid_post") for kind in FAMILIES.values())
    raise ValueError(f"Unknown site name {site_name!r}; site names look like {examples}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def resolve_architecture(model: nn.Module, architecture: ArchitectureSpec | None = None) -> ArchitectureSpec:
    """Return the module layout of ``model``: ``architecture`` if given, else an override, else discovered."""
    if architecture is not None:
        return architecture
    root = unwrap_model(model)
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    try:
        return ArchitectureSpec(**discover_layout(root))
    except DiscoveryError as error:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported out of the box: {error}; e.g. in config "
            "`architecture: {layers: model.layers, attn_out_proj: self_attn.o_proj, mlp_out_proj: mlp.down_proj}`"
        ) from None


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of a Linear, a GPT-2 ``Conv1D`` or a PEFT-wrapped one."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if is_conv1d(module) and weight is not None:
        return weight.shape[0], weight.shape[1]
    raise TypeError(f"Expected a linear projection, got {type(module).__name__}")


def default_layer(model: nn.Module, architecture: ArchitectureSpec | None = None) -> int:
    """The block attribution and steering vectors use when none is named: the one at 3/4 depth (mid-to-late, as in the paper)."""
    spec = resolve_architecture(model, architecture)
    num_layers = len(_get_submodule(unwrap_model(model), spec.layers, "decoder blocks"))
    return round(0.75 * (num_layers - 1))


def _get_submodule(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as error:
        raise UnsupportedArchitectureError(
            f"Module path {path!r} ({what}) does not exist in {type(root).__name__}: {error}. Check the `architecture` module paths."
        ) from None


def discover_sites(
    model: nn.Module,
    families: Iterable[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    architecture: ArchitectureSpec | None = None,
) -> list[Site]:
    """List the sites of ``families`` at ``layers`` (all layers if None) of ``model``.

    Negative layer indices count from the end. Works on plain and PEFT-wrapped models.
    """
    families = list(families)
    unknown = [family for family in families if family not in FAMILIES]
    if unknown:
        raise ValueError(f"Unknown site families {unknown}; choose from {list(FAMILIES)}")
    spec = resolve_architecture(model, architecture)
    root = unwrap_model(model)
    blocks = _get_submodule(root, spec.layers, "decoder blocks")
    num_layers = len(blocks)
    chosen = range(num_layers) if layers is None else layers
    sites = []
    for layer in chosen:
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"Layer {layer} is out of range for a model with {num_layers} blocks")
        layer %= num_layers
        block_path = f"{spec.layers}.{layer}"
        for family in families:
            sites.extend(_make_sites(root, spec, family, layer, block_path))
    if "sae_feature" in families and not any(site.kind.sae for site in sites):
        attached = list(attached_saes(root)) or "none"
        raise ValueError(
            f"No SAE is attached at layers {list(chosen)}, so there are no sae_feature sites there (attached: {attached}); "
            "attach one with `saes: [path/to/sae]` (ipg_lightning.sae.attach_sae in Python), or attribute its layer"
        )
    return sites


def _make_sites(root: nn.Module, spec: ArchitectureSpec, family: str, layer: int, block_path: str) -> list[Site]:
    kind = FAMILIES[family]
    if kind.sae:
        return _sae_sites(root, spec, layer, block_path)
    if kind.sublayer is None:  # the block's output: the residual stream
        return [Site(family, layer, block_path, root.config.hidden_size, foldable=False)]
    if kind.scales_weight or kind.shared_expert:
        return _expert_sites(root, spec, kind, layer, block_path)
    projection, norm = (spec.attn_out_proj, spec.attn_out_norm) if kind.sublayer == "attn" else (spec.mlp_out_proj, spec.mlp_out_norm)
    if projection is None:  # a mixture-of-experts MLP: only its whole output is one place
        if kind.hooks_input:
            raise ValueError(
                f"Block {layer} has no single MLP down-projection: its MLP ({block_path}.{spec.mlp_block}) is a mixture of experts, "
                f"so {family} sites do not exist there; use expert_neuron, expert, mlp_out, attn_head, attn_out or resid_post"
            )
        return [Site(family, layer, f"{block_path}.{norm or spec.mlp_block}", 1, foldable=False)]
    path = f"{block_path}.{projection}"
    in_features, _ = projection_shape(_get_submodule(root, path, family))
    if not kind.hooks_input:  # the whole sub-layer: what it adds to the residual stream, after its own norm if it has one
        return [Site(family, layer, f"{block_path}.{norm}" if norm else path, 1, foldable=norm is None)]
    if not kind.per_head:
        return [Site(family, layer, path, in_features)]
    num_heads = root.config.num_attention_heads
    if in_features % num_heads:
        raise ValueError(f"{path} has {in_features} inputs, not divisible by {num_heads} heads")
    return [Site(family, layer, path, num_heads, head_dim=in_features // num_heads)]


def _expert_sites(root: nn.Module, spec: ArchitectureSpec, kind: SiteFamily, layer: int, block_path: str) -> list[Site]:
    """Sites of the mixture-of-experts families: expert neurons, whole experts, the shared expert."""
    if kind.scales_weight:
        experts = spec.experts
        if experts is None:
            raise ValueError(f"Block {layer} has no fused mixture-of-experts weights, so {kind.name} sites do not exist there")
        path, fields = f"{block_path}.{experts.path}", {"parameter": experts.parameter, "input_axis": experts.input_axis}
        if kind.per_expert:
            return [Site(kind.name, layer, path, experts.width, expert=index, **fields) for index in range(experts.count)]
        return [Site(kind.name, layer, path, experts.count, bias=experts.bias, **fields)]
    if spec.shared_expert_proj is None:
        raise ValueError(f"Block {layer} has no shared expert, so {kind.name} sites do not exist there")
    path = f"{block_path}.{spec.shared_expert_proj}"
    in_features, _ = projection_shape(_get_submodule(root, path, kind.name))
    return [Site(kind.name, layer, path, in_features if kind.hooks_input else 1)]


def _sae_sites(root: nn.Module, spec: ArchitectureSpec, layer: int, block_path: str) -> list[Site]:
    """The features of each SAE attached at block ``layer``, spliced where its hook point's family hooks."""
    sites = []
    for sae in attached_saes(root).values():
        where = sae_point(sae.hook_name)
        if where.layer != layer:
            continue
        width = root.config.hidden_size
        if sae.d_in != width:
            raise ValueError(
                f"The SAE at {sae.hook_name} reads {sae.d_in} channels, but {where.activation_name} of this model has {width}: "
                "it was trained for another model"
            )
        (host,) = _make_sites(root, spec, SAE_POINTS[where.point], layer, block_path)
        sites.append(Site("sae_feature", layer, host.module_path, sae.d_sae, foldable=False, point=where.point, sae=sae))
    return sites


def find_site(model: nn.Module, site_name: str, architecture: ArchitectureSpec | None = None) -> Site:
    """The site of ``model`` called ``site_name`` (e.g. ``blocks.1.mlp.experts.3.hook_post``)."""
    family, layer = parse_site_name(site_name)
    try:
        sites = discover_sites(model, [family], [layer], architecture)
    except ValueError as error:  # e.g. a layer beyond the model's blocks
        raise type(error)(f"{site_name} cannot be found in this model: {error}") from None
    for site in sites:
        if site.name == site_name:
            return site
    raise ValueError(f"{site_name} does not exist in this model")
