"""Fold steering vectors into projection biases, so a plain checkpoint reproduces the steered model.

A constant vector added to what an attention or MLP sub-layer writes into the residual stream is a
bias on that sub-layer's output projection, where no norm follows it (``attn_out`` and ``mlp_out``
sites whose gates fold). A vector added to a block's output (``resid_post``) is the same bias on
the block's last writer, its MLP output projection, where that projection's output is added to the
stream as it is. Where a projection has no bias, the architecture's own configuration flag that
gives it one (``mlp_bias``, ``attention_bias``, ...) is switched on, and every bias the flag brings
is added as zeros, so ``from_pretrained`` loads the exported bias with nothing else changed.

Every fold is checked: the folded model must give the hooked model's logits on a probe input, else
the fold is undone and the vectors stay in the steering file (an architecture that scales what a
sub-layer writes, e.g. Granite's ``residual_multiplier``, is caught here).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.interventions import attached
from ipg_lightning.model.sites import Site, discover_sites, projection_shape, unwrap_model
from ipg_lightning.vectors.additive import SteeringVectors

#: Configuration flags with which Hugging Face architectures give their projections biases.
BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias", "add_bias_linear")


@dataclass
class VectorFold:
    """What folding steering vectors did.

    Args:
        folded: the sites whose vectors are now projection biases.
        carried: the vectors that could not fold (None if every one did), to travel in a steering file.
        config_flags: the configuration flags switched on so that ``from_pretrained`` creates the biases.
    """

    folded: list[str]
    carried: SteeringVectors | None
    config_flags: list[str]


def bias_projection(model: nn.Module, site: Site, architecture: ArchitectureSpec | None = None) -> str | None:
    """The module path of the projection whose bias adds what ``site``'s vector adds, or None where none does."""
    if site.family in ("attn_out", "mlp_out"):
        return site.module_path if site.foldable else None
    try:
        (writer,) = discover_sites(model, ["mlp_out"], [site.layer], architecture)
    except ValueError:
        return None
    return writer.module_path if writer.foldable else None


def _bias_flag(root: nn.Module, path: str) -> tuple[str, list[str]] | None:
    """A configuration flag that gives the projection at ``path`` a bias, and the names of the parameters it adds."""
    for flag in BIAS_FLAGS:
        if getattr(root.config, flag, None) is not False:
            continue
        config = copy.deepcopy(root.config)
        setattr(config, flag, True)
        try:
            with torch.device("meta"):
                probe = type(root)(config)
        except Exception:  # an architecture whose constructor rejects the flag
            continue
        added = sorted(set(probe.state_dict()) - set(root.state_dict()))
        if getattr(probe.get_submodule(path), "bias", None) is not None and all(name.endswith(".bias") for name in added):
            return flag, added
    return None


@torch.no_grad()
def fold_vectors_into_biases(
    model: nn.Module,
    vectors: SteeringVectors,
    probe_ids: torch.Tensor,
    architecture: ArchitectureSpec | None = None,
    keep: Iterable[str] = (),
) -> VectorFold:
    """Write the vectors that fold into projection biases of ``model`` (in place); return what folded and what did not.

    The vectors of the sites in ``keep`` are carried, never folded: e.g. a block output whose gates
    stay hooks, which must scale the block's output before the vector is added, not after.

    ``probe_ids`` (a short batch of token ids) checks the fold: the folded model, with the vectors
    that did not fold hooked, must give the hooked model's logits, else every fold is undone and all
    the vectors are carried.
    """
    if vectors.alpha == 0:
        return VectorFold([], None, [])
    if vectors.positions != "all":  # a bias acts at every position
        return VectorFold([], vectors, [])
    root = unwrap_model(model)
    hosts = {name: bias_projection(root, site, architecture) for name, site in vectors.sites.items()}
    keep = set(keep)
    foldable = {name: path for name, path in hosts.items() if path is not None and name not in keep}
    flags: dict[str, list[str]] = {}
    for name, path in list(foldable.items()):
        if getattr(root.get_submodule(path), "bias", None) is None:
            found = _bias_flag(root, path)
            if found is None:
                del foldable[name]
            else:
                flags.setdefault(found[0], found[1])
    if not foldable:
        return VectorFold([], vectors, [])
    with vectors.attach(model):
        expected = model(probe_ids).logits
    saved = {path: None if root.get_submodule(path).bias is None else root.get_submodule(path).bias.detach().clone() for path in foldable.values()}
    created = _create_zero_biases(root, [name for names in flags.values() for name in names])
    for flag in flags:
        setattr(root.config, flag, True)
    for name, path in foldable.items():
        module = root.get_submodule(path)
        module.bias.add_((vectors.alpha * vectors.vector(name).detach()).to(module.bias))
    rest = _rest(vectors, [name for name in vectors.sites if name not in foldable])
    with attached(model, rest):
        folded = model(probe_ids).logits
    tolerance = 1e-4 if expected.dtype == torch.float32 else 2e-2  # the hook rounds alpha * v once, the bias in its own dtype
    if torch.allclose(folded, expected, rtol=tolerance, atol=tolerance):
        return VectorFold(list(foldable), rest, list(flags))
    for path, bias in saved.items():  # not exact on this architecture: undo, carry everything
        if bias is not None:
            root.get_submodule(path).bias.copy_(bias)
    for module_path in created:
        root.get_submodule(module_path).bias = None
    for flag in flags:
        setattr(root.config, flag, False)
    return VectorFold([], vectors, [])


def _create_zero_biases(root: nn.Module, parameter_names: list[str]) -> list[str]:
    """Give each projection named in ``parameter_names`` (``...proj.bias``) a zero bias; return their module paths."""
    created = []
    for parameter in parameter_names:
        module_path, _, name = parameter.rpartition(".")
        module = root.get_submodule(module_path)
        if name != "bias" or getattr(module, "bias", None) is not None:
            continue
        _, out_features = projection_shape(module)
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad)
        created.append(module_path)
    return created


def _rest(vectors: SteeringVectors, names: list[str]) -> SteeringVectors | None:
    """The vectors of ``names`` alone (None if there are none), with the same strength and provenance."""
    if not names:
        return None
    rest = SteeringVectors([vectors.sites[name] for name in names], vectors.width, vectors.alpha, vectors.provenance, vectors.positions)
    for name in names:
        rest.set_vector(name, vectors.vector(name).detach())
    return rest
