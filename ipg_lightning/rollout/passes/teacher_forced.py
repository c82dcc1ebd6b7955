"""How the teacher-forced passes over one set of fixed trajectories run, and what bounds their memory.

IPG's fixed estimation runs the same trajectories through the model q times with different gate
values. :class:`TeacherForcedPasses` decides, once for all those passes,

- which rows go together: at most ``chunk_size`` rows and, with :class:`MemoryLimits`, at most
  ``chunk_tokens`` tokens (rows x padded width) per forward/backward, or as many as a memory
  budget allows, measured on the first chunk;
- which blocks do not run again: the frozen blocks below the lowest gate are replayed from the
  first pass (:class:`~ipg_lightning.rollout.passes.frozen_prefix.FrozenPrefix`);
- which blocks keep less for backward: with ``checkpoint_blocks`` the blocks from the lowest gate
  up keep only their input and recompute the rest during backward (activation checkpointing).

None of this changes the scores beyond float rounding; the tests hold them equal to 1e-6.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.sites import resolve_architecture, unwrap_model
from ipg_lightning.rollout.passes.frozen_prefix import FrozenPrefix
from ipg_lightning.rollout.passes.local_credit import local_credit
from ipg_lightning.rollout.passes.memory import PeakMemory, peak_is_resettable


class Trajectories(Protocol):
    """What the passes read of :class:`ipg_lightning.rollout.trajectories.Trajectories` (a protocol: no import back)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]

    def __len__(self) -> int: ...

    def select(self, rows: Sequence[int]) -> Trajectories: ...


GIB = 2**30


@dataclass(frozen=True)
class MemoryLimits:
    """Bounds on the memory of the teacher-forced passes over long traces.

    Args:
        chunk_tokens: at most this many tokens (rows x padded width, prompt included) in one
            forward/backward, on top of the ``chunk_size`` rows; a longer row runs alone.
        budget_gb: choose ``chunk_tokens`` from a budget in GiB, above the memory in use when the
            passes start: the first chunk is one row, its peak is measured, and its cost per token
            sizes the other chunks. Needs a peak counter that can be reset (CUDA, or Linux).
        checkpoint_blocks: from the lowest gated block up, keep only each block's input for
            backward and recompute the rest during backward (activation checkpointing): less
            memory for about one more forward pass of those blocks.
    """

    chunk_tokens: int | None = None
    budget_gb: float | None = None
    checkpoint_blocks: bool = False

    def __post_init__(self) -> None:
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"memory.chunk_tokens must be at least 1, got {self.chunk_tokens}")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise ValueError(f"memory.budget_gb must be positive, got {self.budget_gb}")
        if self.chunk_tokens is not None and self.budget_gb is not None:
            raise ValueError("give memory.chunk_tokens or memory.budget_gb, not both (the budget chooses chunk_tokens)")


def padded_tokens(trajectories: Trajectories, rows: range) -> int:
    """Tokens in one chunk once padded: rows x (longest prompt + longest completion)."""
    prompt = max(len(trajectories.prompt_ids[r]) for r in rows)
    completion = max(len(trajectories.completion_ids[r]) for r in rows)
    return len(rows) * (prompt + completion)


def token_chunks(trajectories: Trajectories, start: int, chunk_size: int, chunk_tokens: int | None) -> list[range]:
    """Consecutive chunks of rows from ``start``: at most ``chunk_size`` rows and ``chunk_tokens`` padded tokens."""
    layout, total = [], len(trajectories)

    def fits(rows: range) -> bool:
        return len(rows) <= chunk_size and (chunk_tokens is None or padded_tokens(trajectories, rows) <= chunk_tokens)

    while start < total:
        stop = start + 1
        while stop < total and fits(range(start, stop + 1)):
            stop += 1
        layout.append(range(start, stop))
        start = stop
    return layout


class TeacherForcedPasses:
    """The chunk layout, replayed prefix and checkpointed blocks of the passes over one set of trajectories.

    One object serves every pass over the same trajectories, so that the chunks, and the outputs
    the prefix recorded for them, stay the same from pass to pass.

    Args:
        model: the model (plain or PEFT-wrapped), with its gates attached.
        chunk_size: at most this many rows per forward/backward.
        first_live_layer: the lowest block that holds a gate (0: the whole model is live).
        limits: token and memory bounds (:class:`MemoryLimits`).
        reuse_prefix: replay the frozen blocks below ``first_live_layer`` after the first pass.
        architecture: module paths of a decoder that is not built in.
        local_credit: the ``local`` credit path: backward reaches position t's hidden state only
            from the log-probability of the token predicted there (:mod:`ipg_lightning.rollout.passes.local_credit`).
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 8,
        first_live_layer: int = 0,
        limits: MemoryLimits = MemoryLimits(),
        reuse_prefix: bool = False,
        architecture: ArchitectureSpec | None = None,
        local_credit: bool = False,
    ) -> None:
        self.chunk_size, self.limits = chunk_size, limits
        self.device = next(unwrap_model(model).parameters()).device
        if limits.budget_gb is not None and not peak_is_resettable(self.device):
            raise ValueError("memory.budget_gb needs a peak-memory counter that can be reset (CUDA, or Linux /proc); set memory.chunk_tokens instead")
        blocks = list(unwrap_model(model).get_submodule(resolve_architecture(model, architecture).layers))
        head = unwrap_model(model).get_output_embeddings().weight
        self.logits_bytes_per_token = head.shape[0] * head.element_size()
        self.prefix = FrozenPrefix(model, first_live_layer, architecture) if reuse_prefix else None
        self.checkpointed = blocks[first_live_layer:] if limits.checkpoint_blocks else []
        self.local = blocks[first_live_layer:] if local_credit else []
        self.chunk_tokens = limits.chunk_tokens
        self.layout: list[range] | None = None  # set by the first complete pass
        self._trajectories: Trajectories | None = None

    def chunks(self, trajectories: Trajectories) -> Iterator[tuple[range, Trajectories]]:
        """Yield ``(rows, chunk)``; the first pass fixes the layout (measuring the budget's cost), later passes repeat it."""
        if self._trajectories is None:
            self._trajectories = trajectories
        elif trajectories is not self._trajectories:
            raise ValueError("one TeacherForcedPasses serves one set of trajectories; make a new one for other trajectories")
        if self.layout is not None:
            for rows in self.layout:
                yield rows, trajectories.select(rows)
            return
        layout, start = [], 0
        if self.limits.budget_gb is not None and self.chunk_tokens is None:
            first = range(0, 1)
            with PeakMemory(self.device) as meter:
                yield first, trajectories.select(first)
            # A small model's row may fit in memory the process already holds; it needs its logits at least.
            per_token = max(meter.peak_above_start_bytes / padded_tokens(trajectories, first), self.logits_bytes_per_token)
            self.chunk_tokens = max(math.floor(self.limits.budget_gb * GIB / per_token), 1)
            longest = max(padded_tokens(trajectories, range(row, row + 1)) for row in range(len(trajectories)))
            if longest > self.chunk_tokens:
                warnings.warn(
                    f"memory.budget_gb={self.limits.budget_gb} fits {self.chunk_tokens} tokens per chunk, but the longest trajectory "
                    f"has {longest} (about {longest * per_token / GIB:.2f} GiB): rows that long run alone and exceed the budget; "
                    "set memory.checkpoint_blocks=true or raise the budget",
                    stacklevel=2,
                )
            layout, start = [first], 1
        rest = token_chunks(trajectories, start, self.chunk_size, self.chunk_tokens)
        for rows in rest:
            yield rows, trajectories.select(rows)
        self.layout = layout + rest

    @contextmanager
    def run(self, rows: range) -> Iterator[None]:
        """Around one forward (and backward) over the chunk ``rows``: replay the prefix, checkpoint the live blocks."""
        with ExitStack() as stack:
            if self.prefix is not None:
                stack.enter_context(self.prefix.reuse((rows.start, rows.stop)))
            if self.local and torch.is_grad_enabled():  # outside the checkpointing: recomputation runs it again
                stack.enter_context(local_credit(self.local))
            if self.checkpointed and torch.is_grad_enabled():
                stack.enter_context(_checkpointed(self.checkpointed))
            yield


@contextmanager
def _checkpointed(blocks: list[nn.Module]) -> Iterator[None]:
    """Each block's forward runs under non-reentrant activation checkpointing (hooks inside it run again in backward)."""
    try:
        for block in blocks:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)  # an instance attribute shadows the class's
        yield
    finally:
        for block in blocks:
            vars(block).pop("forward", None)
