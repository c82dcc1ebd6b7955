"""The one way a hook is placed on a site: read or replace the site's activation.

A site's activation is its module's input where the site hooks the input (a projection's input
channels: neurons, heads), else its module's output, the first element where the module returns a
tuple (a decoder block). :func:`hook_site` hides that rule from every caller: gates, activation
capture, the explorer's traces, SAE training and slice checks all pass a function of the activation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ipg_lightning.model.sites import Site, unwrap_model

#: A function of a site's activation: a tensor it returns replaces the activation, None leaves it.
SiteEdit = Callable[[torch.Tensor], torch.Tensor | None]


def hook_site(model: nn.Module, site: Site, edit: SiteEdit) -> RemovableHandle:
    """Pass ``site``'s activation to ``edit`` at every forward of ``model`` (plain or PEFT-wrapped) until the handle is removed."""
    module = unwrap_model(model).get_submodule(site.module_path)
    if site.hooks_input:

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            value = edit(args[0])
            return None if value is None else (value, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        value = edit(output[0] if isinstance(output, tuple) else output)
        if value is None:
            return None
        return (value, *output[1:]) if isinstance(output, tuple) else value

    return module.register_forward_hook(hook)


@contextmanager
def site_hooks(model: nn.Module, edits: Iterable[tuple[Site, SiteEdit]]) -> Iterator[None]:
    """Hooks on several sites (``(site, edit)`` pairs, see :func:`hook_site`), always removed on exit."""
    with ExitStack() as stack:
        for site, edit in edits:
            stack.callback(hook_site(model, site, edit).remove)
        yield
