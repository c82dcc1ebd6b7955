"""The Hugging Face model's gates, mirrored onto the modules of a vLLM engine's model.

vLLM builds its models with the module names of the Hugging Face checkpoints they load
(``model.layers.3.mlp.down_proj``), so each :class:`~ipg_lightning.model.sites.Site` found on the
Hugging Face model (from the one family table) names the engine's module too, and its edit is the
same :meth:`~ipg_lightning.model.sites.Site.edit`, reading the same gate tensors: gates learned or
interpolated in the Lightning module act inside the engine with no copying. Additive steering
vectors (:mod:`ipg_lightning.vectors`) are mirrored the same way, through their own edit.

Two things differ in vLLM and are handled here: its tensors are (tokens, width), which an edit over
the last axis does not notice, and its decoder layers return ``(hidden_states, residual)`` whose
**sum** is the residual stream, so a block-output site edits the sum and hands the next layer
``(edited, 0)``. What cannot be mirrored (a PEFT adapter, a weight parametrization such as expert
gates or trained weight slices, a hook that is neither a gate nor a vector) is refused in one line naming the HF
engine, and :func:`probe_gates` checks that every hook fires before any completion is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ipg_lightning.model.hooks import SiteEdit, hook_site
from ipg_lightning.model.interventions import Intervention
from ipg_lightning.model.sites import Site, edits_block_output, unwrap_model

USE_HF = "sample with `engine: hf` instead"


class EngineGateError(RuntimeError):
    """Raised when the gates on the Hugging Face model cannot act, or did not act, inside the vLLM engine."""


def hook_engine_site(engine_model: nn.Module, site: Site, edit: SiteEdit) -> RemovableHandle:
    """Pass ``site``'s activation in the engine's model to ``edit``, as :func:`~ipg_lightning.model.hooks.hook_site` does in Hugging Face's."""
    try:
        engine_model.get_submodule(site.module_path)
    except AttributeError:
        raise EngineGateError(
            f"The vLLM model ({type(engine_model).__name__}) has no module {site.module_path!r} for the gates of {site.name}: {USE_HF}"
        ) from None
    if not edits_block_output(site):
        return hook_site(engine_model, site, edit)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if not (isinstance(output, tuple) and len(output) == 2):
            raise EngineGateError(f"vLLM's block {site.module_path} returned {type(output).__name__}, not (hidden_states, residual): {USE_HF}")
        hidden, residual = output
        stream = hidden if residual is None else hidden + residual
        value = edit(stream)
        return (stream if value is None else value, None if residual is None else torch.zeros_like(residual))

    return engine_model.get_submodule(site.module_path).register_forward_hook(hook)


def check_mirrorable(model: nn.Module, gate_sets: list[Intervention]) -> None:
    """Refuse a Hugging Face model whose steering the engine would not reproduce exactly (one line, naming the HF engine)."""
    root = unwrap_model(model)
    if root is not model and getattr(model, "peft_config", None):
        raise EngineGateError(f"The model carries a PEFT adapter, which the vLLM engine (loading the model's own weights) would not apply: {USE_HF}")
    if any(getattr(steering, "positions", "all") != "all" for steering in gate_sets):
        raise EngineGateError(f"Steering vectors added at generated positions only are not applied inside the vLLM engine yet: {USE_HF}")
    weighted = [site.name for gates in gate_sets for site in gates.sites.values() if site.kind.scales_weight]
    if weighted:
        raise EngineGateError(f"Gates that scale fused expert weights ({weighted[0]}) are not applied inside the vLLM engine yet: {USE_HF}")
    changed = [name for name, module in root.named_modules() if parametrize.is_parametrized(module)]
    if changed:
        raise EngineGateError(f"The weights of {changed[0]} are trained or reparametrised in memory; the vLLM engine loads them from disk: {USE_HF}")
    hooks = sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in root.modules())
    gate_hooks = sum(1 for gates in gate_sets for site in gates.sites.values() if not site.kind.scales_weight)
    if hooks != gate_hooks:
        raise EngineGateError(
            f"The model carries {hooks - gate_hooks} forward hooks besides its gates and steering vectors, "
            f"and the vLLM engine mirrors only those: {USE_HF}"
        )


class FiringCounts:
    """How often each mirrored site's hook ran: a site whose count stays 0 did not act."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def counted(self, site: Site, edit: SiteEdit) -> SiteEdit:
        """``edit``, counting its calls under ``site``'s name."""
        self.counts[site.name] = 0

        def run(activation: torch.Tensor) -> torch.Tensor | None:
            self.counts[site.name] += 1
            return edit(activation)

        return run

    def __len__(self) -> int:
        """The number of sites counted."""
        return len(self.counts)

    def silent(self) -> list[str]:
        """The sites whose hooks never ran."""
        return [name for name, count in self.counts.items() if count == 0]

    def reset(self) -> None:
        """Count from zero again."""
        self.counts = dict.fromkeys(self.counts, 0)


@contextmanager
def mirrored_gates(gate_sets: list[Intervention], engine_model: nn.Module | None) -> Iterator[FiringCounts]:
    """Install ``gate_sets`` (the model's gates and steering vectors,
    :func:`~ipg_lightning.model.interventions.installed_interventions`, which :func:`check_mirrorable`
    accepted) on the engine's ``engine_model`` too, in the same order, for the duration of the block."""
    counts = FiringCounts()
    handles: list[RemovableHandle] = []
    try:
        for gates in gate_sets:
            for site in gates.sites.values():
                handles.append(hook_engine_site(engine_model, site, counts.counted(site, partial(gates.edit, site))))
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def probe_gates(counts: FiringCounts, run_probe: Callable[[], None]) -> None:
    """Run ``run_probe`` (one short generation) and refuse to go on if any mirrored gate's hook did not fire.

    A compiled engine (``enforce_eager: false``), a model class vLLM runs without these modules, or a
    changed vLLM would otherwise sample the unsteered model without a word.
    """
    if not counts:
        return
    counts.reset()
    run_probe()
    silent = counts.silent()
    counts.reset()  # the call that follows is counted on its own
    if silent:
        raise EngineGateError(
            f"The gates did not act inside the vLLM engine: the hooks of {len(silent)} of {len(counts.counts)} sites never ran "
            f"(first: {silent[0]}); a compiled engine ignores them, so set `vllm.enforce_eager: true`, or {USE_HF}"
        )
