"""Which positions of the current forward pass hold generated tokens, for edits that act there only.

A steering vector can be added at generated positions only (``positions="generated"``). Inside
``generate`` with a KV cache that is every decode step (the prompt's prefill gets nothing); in a
teacher-forced pass over prompt and completion, the caller declares which positions are generated
with :func:`completion_positions` (the library's scoring and activation reading do). A pass that
declares nothing and is not a decode step is treated as a prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_COMPLETION_MASK: ContextVar[torch.Tensor | None] = ContextVar("completion_mask", default=None)


@contextmanager
def completion_positions(mask: torch.Tensor) -> Iterator[None]:
    """Declare that the forward passes in this block run over padded rows whose generated tokens are ``mask`` (rows, positions: 1 where generated)."""
    token = _COMPLETION_MASK.set(mask)
    try:
        yield
    finally:
        _COMPLETION_MASK.reset(token)


def declared_completion_mask() -> torch.Tensor | None:
    """The (rows, positions) mask declared by the innermost :func:`completion_positions`, or None."""
    return _COMPLETION_MASK.get()


def is_decode_step(kwargs: dict) -> bool:
    """True if a causal LM's forward ``kwargs`` continue a filled KV cache (a decode step of ``generate``), not a prefill or a cache-free pass."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers renamed the argument in 5.2x
    return cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0
