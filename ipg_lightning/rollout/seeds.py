"""Seeds of prompts and of single completions, stable across runs, batches and devices.

A prompt's seed comes from its dataset example (or from its text); a completion's seed mixes the
global seed, the prompt's seed and the sample index. Sampling draws each completion from its own
generator with that seed, so a trajectory never depends on what else shares its batch.
"""

from __future__ import annotations

import hashlib


def prompt_seed(prompt: str) -> int:
    """A stable seed derived from a prompt's text (used when a prompt has no seed of its own)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")


def row_seed(global_seed: int, prompt_seed_value: int, sample: int) -> int:
    """The seed of one completion: a hash of the global seed, the prompt's seed and the sample index."""
    key = f"{global_seed}:{prompt_seed_value}:{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
