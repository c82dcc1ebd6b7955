"""Component sites of Hugging Face causal LMs: what can be gated, and where it lives.

A *site* is one place in the network (e.g. the residual stream after block 3); its *components*
are the scalar units there (the coordinates of that residual vector). Sites are discovered from the
model: the per-architecture table below only says where the decoder blocks and the two output
projections of each block are. Component names follow the TransformerLens vocabulary
(``blocks.3.hook_resid_post[117]``) so reports compare with other tools.

New site families (for example SAE features) subclass :class:`Site` and override :meth:`Site.edit`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SITE_FAMILIES: tuple[str, ...] = ("resid_post", "mlp_neuron", "attn_head", "attn_out", "mlp_out")

# Hook names in the TransformerLens vocabulary, per family.
_HOOK_NAMES = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "mlp_neuron": "blocks.{layer}.mlp.hook_post",
    "attn_head": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the gated modules of one decoder architecture live.

    Args:
        layers: dotted path from the model root to the list of decoder blocks.
        attn_out_proj: dotted path, inside one block, to the attention output projection.
        mlp_out_proj: dotted path, inside one block, to the MLP down-projection.

    Example (a config entry for an architecture that is not built in)::

        architecture: {layers: model.layers, attn_out_proj: self_attn.o_proj,
                       mlp_out_proj: mlp.down_proj}
    """

    layers: str
    attn_out_proj: str
    mlp_out_proj: str


_LLAMA_LIKE = ArchitectureSpec("model.layers", "self_attn.o_proj", "mlp.down_proj")

#: Built-in architectures, keyed by ``config.model_type``. Only architectures whose out-projection
#: output is added straight into the residual stream are listed, so that sub-layer gates fold exactly.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec("transformer.h", "attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
}


class UnsupportedArchitectureError(ValueError):
    """Raised when a model's architecture is not in :data:`ARCHITECTURES` and none was declared."""


@dataclass(frozen=True)
class Site:
    """One gated place in the network.

    Args:
        family: which kind of component lives here (one of :data:`SITE_FAMILIES`).
        layer: index of the decoder block.
        module_path: dotted path (from the unwrapped model root) of the module the hook goes on.
        size: number of components (gates) at this site.
        head_dim: width of one head's slice of the projection input (``attn_head`` only).
    """

    family: str
    layer: int
    module_path: str
    size: int
    head_dim: int = 1

    @property
    def name(self) -> str:
        """The site's hook name, e.g. ``blocks.3.hook_resid_post``."""
        return _HOOK_NAMES[self.family].format(layer=self.layer)

    @property
    def hooks_input(self) -> bool:
        """True if the gate scales the module's input (a forward pre-hook), else its output."""
        return self.family in ("mlp_neuron", "attn_head")

    def component_name(self, index: int) -> str:
        """Name of one component, e.g. ``blocks.3.attn.hook_z[2]``; scalar sites have no index."""
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name} has {self.size} components, got index {index}")
        return self.name if self.size == 1 else f"{self.name}[{index}]"

    def channel_gates(self, gate: torch.Tensor) -> torch.Tensor:
        """``gate`` (size,) spread over the hooked channels: each head's gate repeated over its slice."""
        return gate.repeat_interleave(self.head_dim) if self.head_dim > 1 else gate

    def edit(self, activation: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Scale ``activation`` (batch, seq, width) by ``gate`` (size,) at every position."""
        return activation * self.channel_gates(gate.to(device=activation.device, dtype=activation.dtype))

    def component_values(self, activation: torch.Tensor) -> torch.Tensor:
        """(batch, seq, width) activation -> (batch, seq, size) per-component values: the signed value of a
        coordinate or neuron, the L2 norm of a head's slice, the L2 norm of a whole sub-layer's output."""
        if self.family == "attn_head":
            return activation.reshape(*activation.shape[:-1], self.size, self.head_dim).norm(dim=-1)
        if self.size == 1:
            return activation.norm(dim=-1, keepdim=True)
        return activation


def parse_site_name(site_name: str) -> tuple[str, int]:
    """``blocks.3.attn.hook_z`` -> ``("attn_head", 3)``; raises ``ValueError`` naming unknown names.

    >>> parse_site_name("blocks.12.hook_resid_post")
    ('resid_post', 12)
    """
    for family, template in _HOOK_NAMES.items():
        prefix, suffix = template.split("{layer}")
        if site_name.startswith(prefix) and site_name.endswith(suffix):
            layer = site_name[len(prefix) : len(site_name) - len(suffix)]
            if layer.isdigit():
                return family, int(layer)
    examples = ", ".join(template.format(layer=3) for template in _HOOK_NAMES.values())
    raise ValueError(f"Unknown site name {site_name!r}; site names look like {examples}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def resolve_architecture(model: nn.Module, architecture: ArchitectureSpec | None = None) -> ArchitectureSpec:
    """Return the module layout of ``model``: ``architecture`` if given, else the built-in entry."""
    if architecture is not None:
        return architecture
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise UnsupportedArchitectureError(
        f"Architecture {model_type!r} is not supported out of the box. Supported model types: "
        f"{', '.join(sorted(ARCHITECTURES))}. For another decoder, declare its module paths, e.g. "
        "in config `architecture: {layers: model.layers, attn_out_proj: self_attn.o_proj, "
        "mlp_out_proj: mlp.down_proj}` or in Python "
        "`ArchitectureSpec(layers='model.layers', attn_out_proj='self_attn.o_proj', mlp_out_proj='mlp.down_proj')`."
    )


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of a Linear, a GPT-2 ``Conv1D`` or a PEFT-wrapped one."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]
    raise TypeError(f"Expected a linear projection, got {type(module).__name__}")


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
    unknown = [family for family in families if family not in SITE_FAMILIES]
    if unknown:
        raise ValueError(f"Unknown site families {unknown}; choose from {list(SITE_FAMILIES)}")
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
            sites.append(_make_site(root, spec, family, layer, block_path))
    return sites


def _make_site(root: nn.Module, spec: ArchitectureSpec, family: str, layer: int, block_path: str) -> Site:
    if family == "resid_post":
        return Site(family, layer, block_path, root.config.hidden_size)
    projection = spec.attn_out_proj if family in ("attn_head", "attn_out") else spec.mlp_out_proj
    path = f"{block_path}.{projection}"
    in_features, _ = projection_shape(_get_submodule(root, path, family))
    if family == "mlp_neuron":
        return Site(family, layer, path, in_features)
    if family == "attn_head":
        num_heads = root.config.num_attention_heads
        if in_features % num_heads:
            raise ValueError(f"{path} has {in_features} inputs, not divisible by {num_heads} heads")
        return Site(family, layer, path, num_heads, head_dim=in_features // num_heads)
    return Site(family, layer, path, 1)
