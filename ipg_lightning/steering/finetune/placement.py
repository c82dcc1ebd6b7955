"""Where a LoRA adapter goes: the weights that host a selection of components, or a control placement.

A component lives in a sub-layer, and the adapter that can change it sits on that sub-layer's
projections (``docs/method.md`` section 7):

- an MLP neuron (``mlp_neuron``, ``shared_expert_neuron``): every projection of its MLP;
- an attention head (``attn_head``): every projection of its attention;
- a whole sub-layer (``attn_out``, ``mlp_out``, ``shared_expert``): all of its projections, and the
  fused expert weights of a mixture-of-experts MLP;
- a residual coordinate (``resid_post``): the two out-projections that write into that block's output;
- an expert (``expert``, ``expert_neuron``): refused, since its gate scales the fused expert weights
  that the adapter would wrap (the sub-layer placements above adapt those weights through PEFT's
  ``target_parameters``);
- an SAE feature: what hosts the activation its SAE reads (the block, or the sub-layer).

:func:`adapter_targets` turns a ``LoraSettings.placement`` into full module paths: ``localized``
(the hosts above), ``random_layers`` (the same modules in randomly chosen other blocks: the same
parameter count without the localisation, the control) and ``everywhere`` (every projection of
every block).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

from ipg_lightning.gates.component_gates import parse_component_name
from ipg_lightning.model.discovery import is_projection
from ipg_lightning.model.families import FAMILIES, SAE_POINTS, ArchitectureSpec
from ipg_lightning.model.sites import Site, find_site, resolve_architecture, unwrap_model

#: How an adapter is placed: ``target_modules`` (the names given, in every block), or from the selection.
Placement = Literal["target_modules", "localized", "random_layers", "everywhere"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)


@dataclass(frozen=True)
class AdapterTargets:
    """The weights an adapter adapts.

    Args:
        modules: projections, by full dotted path from the unwrapped model (or by name suffix, for
            the ``target_modules`` placement).
        parameters: fused expert weights (3-D parameters) by full dotted path (PEFT ``target_parameters``).
    """

    modules: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()

    @property
    def paths(self) -> list[str]:
        """Every adapted weight: the projections, then the fused parameters."""
        return [*self.modules, *self.parameters]

    def as_dict(self) -> dict[str, list[str]]:
        """Plain lists, for checkpoints, cards and logs."""
        return {"modules": list(self.modules), "parameters": list(self.parameters)}


#: Why an adapter may not sit on fused expert weights that a selected gate scales.
_EXPERT_CLASH = (
    "expert components are gated by scaling {weights}, which a LoRA adapter cannot share (it would compose with the gate in "
    "another order while training than after merging): steer them with gates alone, or place the adapter with "
    "`placement: target_modules`"
)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def projections_in(root: nn.Module, path: str) -> list[str]:
    """Full paths of the projections (``nn.Linear`` or GPT-2 ``Conv1D``) in the module at ``path``, itself included."""
    module = root.get_submodule(path)
    found = []
    for name, child in module.named_modules():
        full = f"{path}.{name}" if name else path
        if is_projection(child) and not any(full.startswith(f"{outer}.") for outer in found):  # not a wrapper's own layers
            found.append(full)
    return found


def sublayer_projections(root: nn.Module, spec: ArchitectureSpec, layer: int, sublayer: str) -> list[str]:
    """The projections of block ``layer``'s attention (``attn``) or MLP (``mlp``), by full path.

    A sub-layer is the module holding its out-projection; where that is the block itself (OPT's
    ``fc1``/``fc2``), the MLP is the block's projections outside its attention.
    """
    block = f"{spec.layers}.{layer}"
    attention = _parent(spec.attn_out_proj)
    if sublayer == "attn":
        return projections_in(root, f"{block}.{attention}" if attention else f"{block}.{spec.attn_out_proj}")
    inner = spec.mlp_block or _parent(spec.mlp_out_proj or "")
    if inner:
        return projections_in(root, f"{block}.{inner}")
    in_attention = set(sublayer_projections(root, spec, layer, "attn"))
    return [path for path in projections_in(root, block) if path not in in_attention]


def _expert_parameters(root: nn.Module, spec: ArchitectureSpec, block_path: str) -> list[str]:
    """The fused expert weights of a block (its gate/up and down projections), if its MLP is a mixture of experts."""
    path = f"{block_path}.{spec.experts.path}" if spec.experts is not None else None
    try:
        experts = root.get_submodule(path) if path else None
    except AttributeError:  # a dense block of a model that mixes dense and mixture-of-experts blocks
        experts = None
    if experts is None:
        return []
    return [f"{path}.{name}" for name in ("gate_up_proj", "up_proj", "down_proj") if isinstance(getattr(experts, name, None), nn.Parameter)]


def component_hosts(root: nn.Module, spec: ArchitectureSpec, site: Site) -> tuple[list[str], list[str]]:
    """(projections, fused expert parameters) that host the components of ``site``, by its family's ``hosts`` rule."""
    return _hosts(root, spec, site.kind.hosts, site.kind.sublayer, site.layer, site.point)


def _hosts(root: nn.Module, spec: ArchitectureSpec, rule: str, sublayer: str | None, layer: int, point: str | None) -> tuple[list[str], list[str]]:
    block = f"{spec.layers}.{layer}"
    if rule == "sae_point":  # what hosts the activation the SAE reads
        kind = FAMILIES[SAE_POINTS[point]]
        return _hosts(root, spec, kind.hosts, kind.sublayer, layer, None)
    if rule == "block_writers":
        return residual_writers(root, spec, layer)
    if rule == "shared_expert":
        return projections_in(root, _parent(f"{block}.{spec.shared_expert_proj}")), []
    if rule == "gated_weights":
        raise ValueError(_EXPERT_CLASH.format(weights=f"the fused expert weights of block {layer}"))
    return sublayer_projections(root, spec, layer, sublayer), _expert_parameters(root, spec, block) if sublayer == "mlp" else []


def residual_writers(root: nn.Module, spec: ArchitectureSpec, layer: int) -> tuple[list[str], list[str]]:
    """(projections, fused expert parameters) that write into block ``layer``'s output: its attention's and MLP's
    out-projections (a mixture of experts': its shared expert's and its experts' down-projections)."""
    block = f"{spec.layers}.{layer}"
    modules = [f"{block}.{spec.attn_out_proj}"]
    if spec.mlp_out_proj is not None:
        return [*modules, f"{block}.{spec.mlp_out_proj}"], []
    if spec.shared_expert_proj is not None:
        modules.append(f"{block}.{spec.shared_expert_proj}")
    return modules, [p for p in _expert_parameters(root, spec, block) if p.endswith("down_proj")]


def localized_targets(model: nn.Module, components: list[str], architecture: ArchitectureSpec | None = None) -> AdapterTargets:
    """The weights hosting ``components`` (see the module docstring), in model order, each once."""
    if not components:
        raise ValueError("A localized adapter needs selected components to place it on")
    root, spec = unwrap_model(model), resolve_architecture(model, architecture)
    modules: dict[str, None] = {}
    parameters: dict[str, None] = {}
    for site in _sites(model, components, architecture):
        found_modules, found_parameters = component_hosts(root, spec, site)
        modules.update(dict.fromkeys(found_modules))
        parameters.update(dict.fromkeys(found_parameters))
    order = {name: index for index, (name, _) in enumerate(root.named_modules())}
    by_order = sorted(modules, key=order.__getitem__)
    return AdapterTargets(tuple(by_order), tuple(sorted(parameters, key=lambda p: order[_parent(p)])))


def _block_and_rest(path: str, blocks: str) -> tuple[int, str]:
    layer, _, rest = path[len(blocks) + 1 :].partition(".")
    return int(layer), rest


def random_layer_targets(model: nn.Module, targets: AdapterTargets, seed: int, architecture: ArchitectureSpec | None = None) -> AdapterTargets:
    """The same modules (by their path inside a block) moved to randomly chosen other blocks, one block for each
    block of ``targets``: the control with the same parameter count and none of the localisation."""
    root, spec = unwrap_model(model), resolve_architecture(model, architecture)
    num_layers = len(root.get_submodule(spec.layers))
    paths = targets.paths
    used = sorted({_block_and_rest(path, spec.layers)[0] for path in paths})
    others = [layer for layer in range(num_layers) if layer not in used]
    if len(others) < len(used):
        raise ValueError(
            f"random_layers needs {len(used)} blocks other than the selection's {used}, but the model has {num_layers}; "
            "select components in fewer blocks"
        )
    moved = dict(zip(used, random.Random(seed).sample(others, len(used)), strict=True))

    def move(path: str) -> str:
        layer, rest = _block_and_rest(path, spec.layers)
        return f"{spec.layers}.{moved[layer]}.{rest}"

    control = AdapterTargets(tuple(map(move, targets.modules)), tuple(map(move, targets.parameters)))
    if [_size(root, path) for path in control.paths] != [_size(root, path) for path in paths]:
        raise ValueError(
            f"random_layers moved the adapter from blocks {used} to {sorted(moved.values())}, whose weights differ "
            f"({', '.join(paths)}): the control needs blocks of one shape; use placement: everywhere for a baseline instead"
        )
    return control


def _size(root: nn.Module, path: str) -> tuple[int, ...] | None:
    """The shape of the weight at ``path`` (a projection's weight, or a parameter), None where there is none."""
    try:
        return tuple(root.get_submodule(path).weight.shape)
    except AttributeError:
        try:
            return tuple(root.get_parameter(path).shape)
        except AttributeError:
            return None


def every_target(model: nn.Module, architecture: ArchitectureSpec | None = None) -> AdapterTargets:
    """Every projection and fused expert weight of every block."""
    root, spec = unwrap_model(model), resolve_architecture(model, architecture)
    modules, parameters = [], []
    for layer in range(len(root.get_submodule(spec.layers))):
        block = f"{spec.layers}.{layer}"
        modules += projections_in(root, block)
        parameters += _expert_parameters(root, spec, block)
    return AdapterTargets(tuple(modules), tuple(parameters))


def adapter_targets(
    model: nn.Module,
    placement: str,
    target_modules: list[str],
    components: list[str],
    seed: int,
    architecture: ArchitectureSpec | None = None,
) -> AdapterTargets:
    """The weights an adapter with ``placement`` adapts (``target_modules`` is used by that placement only).

    Refuses to adapt fused expert weights that a selected ``expert``/``expert_neuron`` gate scales.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if placement == "target_modules":
        return AdapterTargets(tuple(target_modules))
    if placement == "everywhere":
        targets = every_target(model, architecture)
    else:
        targets = localized_targets(model, components, architecture)
        if placement == "random_layers":
            targets = random_layer_targets(model, targets, seed, architecture)
    gated = {f"{site.module_path}.{site.parameter}" for site in _sites(model, components, architecture) if site.kind.scales_weight}
    if gated & set(targets.parameters):
        raise ValueError(_EXPERT_CLASH.format(weights=", ".join(sorted(gated & set(targets.parameters)))))
    return targets


def _sites(model: nn.Module, components: list[str], architecture: ArchitectureSpec | None) -> list[Site]:
    """The sites holding ``components``, each once."""
    return [find_site(model, name, architecture) for name in dict.fromkeys(parse_component_name(c)[0] for c in components)]
