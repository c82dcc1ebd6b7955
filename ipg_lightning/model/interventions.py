"""What edits a model's activations right now: the gate and vector sets installed on it.

An *intervention* is a set of sites and one edit per site: multiplicative gates
(:class:`~ipg_lightning.gates.component_gates.ComponentGates`) and additive steering vectors
(:class:`~ipg_lightning.vectors.additive.SteeringVectors`). Each lists itself here while its hooks
are installed, so a sampler that runs the model somewhere else (the vLLM engine) applies exactly
these, in the order they were installed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from typing import Protocol

import torch
from torch import nn

from ipg_lightning.model.hooks import hook_site
from ipg_lightning.model.sites import Site, unwrap_model


def parameter_key(site_name: str) -> str:
    """The key of a site's tensor in an intervention's ``ParameterDict`` (module keys cannot hold dots)."""
    return site_name.replace(".", "__")


class Intervention(Protocol):
    """A set of sites and the edit each site's activation gets (what an engine mirrors)."""

    sites: dict[str, Site]

    def edit(self, site: Site, activation: torch.Tensor) -> torch.Tensor:
        """``site``'s ``activation`` as this intervention changes it."""

    def attach(self, model: nn.Module) -> AbstractContextManager:
        """Install it on ``model`` for the duration of a block."""


# The interventions installed on each model (its unwrapped root), in installation order.
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, list[Intervention]] = weakref.WeakKeyDictionary()


class InstalledRecord:
    """A handle that lists an intervention as installed on a model until it is removed (see :func:`installed_interventions`)."""

    def __init__(self, root: nn.Module, intervention: Intervention) -> None:
        self.root = weakref.ref(root)
        self.intervention = intervention
        _INSTALLED.setdefault(root, []).append(intervention)

    def remove(self) -> None:
        """Take the intervention off the model's list (its hooks are removed by their own handles)."""
        root = self.root()
        installed = _INSTALLED.get(root, []) if root is not None else []
        if self.intervention in installed:
            installed.remove(self.intervention)


def installed_interventions(model: nn.Module) -> list[Intervention]:
    """The gate and vector sets installed on ``model`` (plain or PEFT-wrapped) right now, in the order they were installed."""
    return list(_INSTALLED.get(unwrap_model(model), []))


class Handle(Protocol):
    """Anything an installation returns that undoes one part of it."""

    def remove(self) -> None:
        """Undo it."""


def install_intervention(
    model: nn.Module, intervention: Intervention, sites: Iterable[Site], first: Callable[[nn.Module], list[Handle]] | None = None
) -> list[Handle]:
    """Hook ``intervention``'s edit on each of ``sites`` of ``model`` (plain or PEFT-wrapped) and list it as installed.

    ``first`` installs what is not a hook (a weight parametrisation) on the unwrapped model. On any
    failure everything installed so far is removed again. Returns the handles that undo it all.
    """
    root = unwrap_model(model)
    handles: list[Handle] = [InstalledRecord(root, intervention)]
    try:
        if first is not None:
            handles += first(root)
        for site in sites:
            handles.append(hook_site(root, site, partial(intervention.edit, site)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextmanager
def removed_on_exit(handles: list[Handle]) -> Iterator[None]:
    """Keep what ``handles`` installed for the duration of the block, and always remove it on exit."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def attached(model: nn.Module, *interventions: Intervention | None) -> Iterator[None]:
    """Attach each of ``interventions`` (None entries skipped) to ``model`` in order (on one site, edits
    apply in that order: gates then vectors gives ``c * h + alpha * v``); remove them all on exit."""
    with ExitStack() as stack:
        for intervention in interventions:
            if intervention is not None:
                stack.enter_context(intervention.attach(model))
        yield
