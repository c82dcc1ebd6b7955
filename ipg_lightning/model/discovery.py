"""Find where a decoder's gated modules live, from the model itself.

One short probe forward pass (four tokens, no gradients) records which modules of the first decoder
block run, in which order, on which tensors. From that record:

- the **decoder blocks** are the ``nn.ModuleList`` with one entry per layer;
- the **attention output projection** is the last projection that runs inside the block's attention
  module (``self_attn``, ``attn``, ``attention``, ``self_attention``, ...);
- the **MLP down-projection** is the last projection that runs inside its MLP module, or, in blocks
  without one (OPT), the last projection outside attention that writes the model width;
- a **post-sub-layer norm** (Gemma 2/3, OLMo 2) is a norm whose input is exactly what a projection
  wrote: there the sub-layer's contribution to the residual stream is that norm's output, so the
  sub-layer gate goes after it.

Nothing depends on module names beyond recognising the attention and MLP containers, so blocks with
parallel attention and MLP, biases, GPT-2's ``Conv1D``, grouped-query attention and ``head_dim``
other than ``hidden / heads`` all come out right.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipg_lightning.model.experts import find_experts

#: Names of a block's attention and MLP containers.
_ATTENTION = re.compile(r"^(self_attn|attn|attention|self_attention|mixer)$")
_MLP = re.compile(r"^(mlp|feed_forward|ffn|block_sparse_moe)$")
_PROBE_TOKENS = 4

_cache: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class DiscoveryError(ValueError):
    """The model's blocks or projections could not be found; the message lists what was found."""


@dataclass(frozen=True)
class ProbedCall:
    """One module call seen during the probe: its path inside the block, kind, and the tensors it read and wrote."""

    path: str
    kind: str
    input: torch.Tensor | None
    output: torch.Tensor | None


def num_layers_of(config: Any) -> int | None:
    """The number of decoder blocks a config declares, under any of its usual names."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_block_list(root: nn.Module) -> str:
    """The dotted path of the ``nn.ModuleList`` holding one decoder block per layer."""
    expected = num_layers_of(getattr(root, "config", None))
    lists = [(name, len(module)) for name, module in root.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    for name, length in lists:
        if length == expected:
            return name
    raise DiscoveryError(
        f"No list of {expected} decoder blocks in {type(root).__name__}; module lists found: "
        f"{[f'{name} ({length})' for name, length in lists] or 'none'}. Declare the blocks with ArchitectureSpec(layers=...)"
    )


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D`` (weights stored (in, out)), also when reparametrised."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def is_projection(module: nn.Module) -> bool:
    """Whether ``module`` is a linear projection: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _kind(module: nn.Module) -> str | None:
    module = getattr(module, "base_layer", module)  # a PEFT-wrapped projection
    if is_projection(module):
        return "projection"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return None


def probe_block(root: nn.Module, blocks_path: str, containers: tuple[str, ...] = ()) -> list[ProbedCall]:
    """Run four tokens through ``root`` and record the projection and norm calls of its first block, in order
    (and the calls of the ``containers`` named, as kind ``container``)."""
    block = root.get_submodule(blocks_path)[0]
    calls: list[ProbedCall] = []
    handles = []

    def recorder(path: str, kind: str):
        def hook(module, args, output):  # copies: blocks may add into these tensors in place later (Falcon)
            first = args[0].clone() if args and isinstance(args[0], torch.Tensor) else None
            result = output[0] if isinstance(output, tuple) else output
            calls.append(ProbedCall(path, kind, first, result.clone() if isinstance(result, torch.Tensor) else None))

        return hook

    kinds = {path: "container" if path in containers else _kind(module) for path, module in block.named_modules() if path}
    projections = [path for path, kind in kinds.items() if kind == "projection"]
    for path, kind in kinds.items():
        inside_a_projection = any(path.startswith(f"{outer}.") for outer in projections)  # a PEFT wrapper's own layers
        if kind is not None and not inside_a_projection:
            handles.append(block.get_submodule(path).register_forward_hook(recorder(path, kind)))
    vocab = getattr(root.config, "vocab_size", 8) or 8
    device = next(root.parameters()).device
    ids = (torch.arange(_PROBE_TOKENS, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    try:
        with torch.no_grad():
            root(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _container(block: nn.Module, pattern: re.Pattern) -> str | None:
    for name, _ in block.named_children():
        if pattern.match(name):
            return name
    return None


def discover_layout(model: nn.Module) -> dict[str, str | None]:
    """The module paths of ``model``'s gated places, found by one probe pass (cached per model).

    Returns ``layers`` (from the root), and inside one block ``attn_out_proj``, ``mlp_out_proj`` and,
    where a norm sits between a projection and the residual add, ``attn_out_norm`` / ``mlp_out_norm``.
    A mixture-of-experts MLP (experts held as fused 3-D weights) has no single down-projection: then
    ``mlp_out_proj`` is None and ``mlp_block`` names the MLP module whose output is the MLP's contribution.
    """
    if model in _cache:
        return _cache[model]
    layers = find_block_list(model)
    block = model.get_submodule(layers)[0]
    attention, mlp = _container(block, _ATTENTION), _container(block, _MLP)
    experts = mlp is not None and any(parameter.dim() == 3 for parameter in block.get_submodule(mlp).parameters())
    expert_lists = [] if mlp is None else [name for name, module in block.get_submodule(mlp).named_modules() if isinstance(module, nn.ModuleList)]
    if expert_lists:  # one module per expert: the "last projection" would be one expert's, not the MLP's
        raise DiscoveryError(
            f"The MLP of {type(block).__name__} holds its experts as a module list ({mlp}.{expert_lists[0]}), which is not supported yet "
            "(fused 3-D expert weights are); declare an ArchitectureSpec to gate its attention and residual sites"
        )
    calls = probe_block(model, layers, containers=(mlp,) if experts else ())
    hidden = getattr(model.config, "hidden_size", None)
    projections = [call for call in calls if call.kind == "projection"]
    attn_out = _last(projections, lambda call: attention is not None and call.path.startswith(f"{attention}."))
    if experts:
        moe = _last(calls, lambda call: call.kind == "container")
        if attn_out is None or moe is None or _width(attn_out) != hidden:
            raise DiscoveryError(f"Could not find the attention output projection of the mixture-of-experts block {type(block).__name__}")
        shared = _last(projections, lambda call: call.path.startswith(f"{mlp}.shared_expert.") and _width(call) == hidden)
        layout = {
            "layers": layers,
            "attn_out_proj": attn_out.path,
            "mlp_out_proj": None,
            "attn_out_norm": _norm_reading(calls, attn_out),
            "mlp_out_norm": _norm_reading(calls, moe),
            "mlp_block": mlp,
            "experts": find_experts(block.get_submodule(mlp), mlp, hidden),
            "shared_expert_proj": shared.path if shared is not None else None,
        }
        _cache[model] = layout
        return layout
    mlp_out = _last(projections, lambda call: mlp is not None and call.path.startswith(f"{mlp}."))
    if mlp_out is None and attention is not None:  # an MLP without a container module (OPT): the last width-preserving projection
        mlp_out = _last(projections, lambda call: not call.path.startswith(f"{attention}.") and _width(call) == hidden)
    found = {
        "blocks": f"{layers} ({len(model.get_submodule(layers))})",
        "attention": attention,
        "mlp": mlp,
        "projections": [call.path for call in projections],
    }
    if attn_out is None or mlp_out is None or _width(attn_out) != hidden or _width(mlp_out) != hidden:
        raise DiscoveryError(
            f"Could not find the attention output projection and the MLP down-projection of {type(block).__name__}: found {found}. "
            "Declare them with ArchitectureSpec(layers=..., attn_out_proj=..., mlp_out_proj=...)"
        )
    layout = {
        "layers": layers,
        "attn_out_proj": attn_out.path,
        "mlp_out_proj": mlp_out.path,
        "attn_out_norm": _norm_reading(calls, attn_out),
        "mlp_out_norm": _norm_reading(calls, mlp_out),
        "mlp_block": None,
        "experts": None,
        "shared_expert_proj": None,
    }
    _cache[model] = layout
    return layout


def _last(calls: list[ProbedCall], keep) -> ProbedCall | None:
    kept = [call for call in calls if keep(call)]
    return kept[-1] if kept else None


def _width(call: ProbedCall) -> int | None:
    return call.output.shape[-1] if call.output is not None else None


def _norm_reading(calls: list[ProbedCall], projection: ProbedCall) -> str | None:
    """The norm whose input is exactly what ``projection`` wrote, if one is called after it."""
    after = calls[calls.index(projection) + 1 :]
    for call in after:
        wrote = projection.output
        if call.kind == "norm" and call.input is not None and call.input.shape == wrote.shape and torch.equal(call.input, wrote):
            return call.path
    return None
