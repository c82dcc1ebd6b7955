"""Fold gate values into projection weights, so a plain model reproduces the gated one.

Exact folds (``docs/method.md`` section 8):

- MLP-neuron gate ``c_i`` scales input column ``i`` of the MLP down-projection;
- attention-head gate ``c_h`` scales the input columns of head ``h`` in the attention output projection;
- sub-layer gates scale the whole projection, bias included;
- expert-neuron and whole-expert gates scale the fused expert weights they act on (and a whole
  expert's bias).

Residual-stream gates have no exact fold (RMSNorm couples the coordinates), so folding them
refuses. LoRA adapters (``merge_and_unload``) and trained weight slices (``merge_weight_slices``) must
be merged first: a gate on a LoRA-wrapped projection scales the adapter's input too, and folding
only the base weight would change the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.discovery import is_conv1d
from ipg_lightning.model.sites import Site, unwrap_model


class UnfoldableGateError(ValueError):
    """Raised when asked to fold gates that have no exact weight equivalent."""


def unfoldable_sites(gates: ComponentGates) -> list[str]:
    """Names of gated sites whose gates differ from 1 and cannot be folded into weights."""
    return [name for name, site in gates.sites.items() if not site.foldable and not torch.all(gates.gate(name) == 1)]


@torch.no_grad()
def fold_gates_into_weights(model: nn.Module, gates: ComponentGates) -> list[str]:
    """Write the gate values of ``gates`` into ``model``'s projection weights, in place.

    Gates whose values are all exactly 1 are skipped. Returns the names of the folded sites.
    Raises :class:`UnfoldableGateError` (and changes nothing) if any gate that is not 1 sits on a
    residual-stream site, or if a gated projection is still LoRA-wrapped.
    """
    refused = unfoldable_sites(gates)
    if refused:
        raise UnfoldableGateError(
            f"Cannot fold gates of {refused} into weights: residual-stream gates, and sub-layer gates after a "
            "norm, have no exact weight equivalent (a norm couples the coordinates). Keep them as a steering "
            "file applied at load time instead of approximating."
        )
    root = unwrap_model(model)
    to_fold = [(name, site) for name, site in gates.sites.items() if not torch.all(gates.gate(name) == 1)]
    for name, site in to_fold:
        module = root.get_submodule(site.module_path)
        if hasattr(module, "base_layer"):
            raise UnfoldableGateError(
                f"{site.module_path} ({name}) is wrapped by a PEFT adapter: merge it first (model.merge_and_unload()), then fold."
            )
        if parametrize.is_parametrized(module):
            raise UnfoldableGateError(
                f"{site.module_path} ({name}) is reparametrised (trained weight slices): merge them first "
                "(ipg_lightning.steering.finetune.slices.merge_weight_slices), then fold."
            )
    for name, site in to_fold:
        _fold_site(root.get_submodule(site.module_path), site, gates.gate(name).detach())
    return [name for name, _ in to_fold]


def _fold_site(module: nn.Module, site: Site, gate: torch.Tensor) -> None:
    if site.kind.scales_weight:  # fused expert weights: multiply them (and a whole expert's bias) by the gate factor
        for name in filter(None, (site.parameter, site.bias)):
            parameter = getattr(module, name)
            parameter.copy_(parameter.float() * site.weight_multiplier(parameter.shape, gate.to(parameter.device, torch.float32)))
        return
    weight = module.weight
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
    input_dim = 0 if is_conv1d(module) else 1
    gate = gate.to(device=weight.device, dtype=torch.float32)
    if not site.hooks_input:  # whole sub-layer: the output is scaled, so weight and bias both are.
        weight.copy_(weight.float() * gate[0])
        if module.bias is not None:
            module.bias.copy_(module.bias.float() * gate[0])
        return
    shape = [1, 1]
    shape[input_dim] = -1
    weight.copy_(weight.float() * site.channel_gates(gate).view(shape))
