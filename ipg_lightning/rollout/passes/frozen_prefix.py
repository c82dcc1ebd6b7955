"""Run the frozen blocks below the first gated one once per chunk of trajectories, not once per pass.

IPG's fixed estimation teacher-forces the same trajectories q times with different gate values.
Gates at block l and above cannot change what blocks 0..l-1 compute, so :class:`FrozenPrefix`
records, on the first pass over a chunk, what block l-1 hands on, and on every later pass over that
chunk replaces blocks 0..l-1 by stubs: block l-1 returns the recorded output, the blocks below it
return their input untouched (their output is ignored). The model's own forward still runs (the
embedding, masks and position embeddings are cheap), so nothing is re-implemented per architecture.

A gate on a block's output (the residual stream after block l, or an SAE spliced there) cannot
change block l itself either: :func:`first_live_block` counts it frozen too. The recording runs
before any other hook on the block, so it keeps the ungated output, and the gate's own hook still
edits the replayed one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.sites import Site, resolve_architecture, unwrap_model


def first_live_block(model: nn.Module, sites: Iterable[Site], architecture: ArchitectureSpec | None = None) -> int:
    """The lowest block whose computation a gate at ``sites`` can change.

    A gate inside block l (a neuron, a head, a sub-layer's output) makes block l live; a gate on block
    l's own output leaves it frozen, so the lowest live block is l + 1.
    """
    blocks = resolve_architecture(model, architecture).layers
    return min(site.layer + (site.module_path == f"{blocks}.{site.layer}" and not site.hooks_input) for site in sites)


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _like(output: Any, hidden: torch.Tensor) -> Any:
    """``hidden`` in the structure of a block's output (a tensor, or a tuple with the hidden state first)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class FrozenPrefix:
    """Per-chunk outputs of the blocks below ``first_live_layer``, replayed on later passes.

    Args:
        model: the model (plain or PEFT-wrapped); the blocks below ``first_live_layer`` must not be
            gated or trained while the cache is in use.
        first_live_layer: the lowest block a gate can change (:func:`first_live_block`); 0 disables caching.
        architecture: module paths of a decoder that is not built in.
    """

    def __init__(self, model: nn.Module, first_live_layer: int, architecture: ArchitectureSpec | None = None) -> None:
        blocks = unwrap_model(model).get_submodule(resolve_architecture(model, architecture).layers)
        self.blocks = list(blocks)[:first_live_layer]
        self.recorded: dict[Any, tuple[Any, list[Any]]] = {}

    @contextmanager
    def reuse(self, key: Any) -> Iterator[None]:
        """Around one forward pass over the chunk ``key``: record the prefix's outputs, or replay them."""
        if not self.blocks:
            yield
            return
        if key not in self.recorded:
            with self._recording(key):
                yield
            return
        last_output, structures = self.recorded[key]
        stubs: list[Callable[..., Any]] = [self._passthrough(structure) for structure in structures[:-1]]
        stubs.append(lambda *args, **kwargs: _like(last_output, _first_tensor(last_output).clone()))  # a block may add in place
        try:
            for block, stub in zip(self.blocks, stubs, strict=True):
                block.forward = stub  # an instance attribute shadows the class's forward
            yield
        finally:
            for block in self.blocks:
                vars(block).pop("forward", None)

    @contextmanager
    def _recording(self, key: Any) -> Iterator[None]:
        outputs: list[Any] = []
        # first among the block's hooks: a gate hooked on the last frozen block's output must not be recorded
        handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output), prepend=True) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if len(outputs) == len(self.blocks):  # a pass that stopped early records nothing
            last = outputs[-1]
            detached = _like(last, _first_tensor(last).detach())
            self.recorded[key] = (detached, [_like(output, None) if isinstance(output, tuple) else None for output in outputs])

    @staticmethod
    def _passthrough(structure: Any) -> Callable[..., Any]:
        """A stub returning its input hidden state in the block's output structure (its output is not read)."""

        def stub(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
            hidden = hidden_states if hidden_states is not None else kwargs.get("hidden_states")
            return _like(structure, hidden) if structure is not None else hidden

        return stub
