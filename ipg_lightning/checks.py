"""Checks of user settings that run before any model loads, with messages that name the option.

>>> check_at_least(1, steps=4, chunk_size=8)
>>> check_at_least(1, steps=0)
Traceback (most recent call last):
...
ValueError: steps must be >= 1, got 0
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def check_at_least(minimum: int, **values: int | None) -> None:
    """Raise naming the first option whose value is below ``minimum`` (or missing)."""
    for name, value in values.items():
        if value is None or value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_sampling_has_signal(num_samples: int, temperature: float, what: str) -> None:
    """Refuse settings under which the N samples of a prompt can never differ, so no prompt carries signal.

    Group advantages compare a prompt's N rewards: one sample, or greedy decoding (all N identical),
    gives every prompt a zero advantage.
    """
    if num_samples < 2:
        raise ValueError(f"{what} compares the rewards of a prompt's samples: num_samples must be >= 2, got {num_samples}")
    if temperature == 0:
        raise ValueError(
            f"{what} with temperature 0 (greedy decoding) draws {num_samples} identical samples per prompt, "
            "which carry no signal: set temperature > 0 (the paper uses 0.6)"
        )


def check_gamma(gamma: float, name: str = "gamma") -> float:
    """Validate a steering value: finite and non-negative."""
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"Steering {name} must be finite and >= 0, got {gamma}")
    return float(gamma)


def check_device(device: str, what: str = "it runs") -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``, or ``auto``: the first GPU if there is one) as a
    torch device, refused before any model loads when it is not a device this machine has."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not (torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; use cpu or one that exists")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: {what} on cpu or cuda")
    return parsed
