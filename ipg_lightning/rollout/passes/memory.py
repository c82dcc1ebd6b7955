"""Peak memory of a stretch of work, on a CUDA device or the CPU.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors only). On the CPU it is the
process's resident high-water mark (``VmHWM``), which Linux lets a process reset by writing ``5``
to ``/proc/self/clear_refs``; large tensors are allocated with ``mmap`` and handed back on free, so
the resident set follows the tensors. Meters nest: an inner meter's reset never hides a peak from
an enclosing one.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_is_resettable(device: torch.device) -> bool:
    """Whether the peak memory on ``device`` can be measured over a stretch of work (not just since start-up)."""
    return device.type == "cuda" or os.access(_CLEAR_REFS, os.W_OK)


class PeakMemory:
    """Context manager: the peak memory in use on ``device`` while the block ran.

    After the block, ``peak_bytes`` is the highest memory in use (CUDA: allocated tensors; CPU: the
    process's resident set) and ``peak_above_start_bytes`` how far that rose above the memory in use
    on entry. Where the peak cannot be reset (a CPU without Linux's ``/proc``), ``peak_bytes`` is the
    process's peak since start-up and ``resettable`` is False.

    Example:
        >>> with PeakMemory(torch.device("cpu")) as meter:
        ...     block = torch.ones(4096, 4096)
        >>> meter.peak_above_start_bytes >= 0
        True
    """

    _active: list[PeakMemory] = []

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.resettable = peak_is_resettable(self.device)
        self.start_bytes = 0
        self.peak_bytes = 0

    @property
    def peak_above_start_bytes(self) -> int:
        """How far the memory in use rose above what was in use when the block started."""
        return max(self.peak_bytes - self.start_bytes, 0)

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS") if _STATUS.exists() else 0

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if _STATUS.exists():
            return _status_bytes("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _CLEAR_REFS.write_text("5")

    def __enter__(self) -> PeakMemory:
        peak = self._peak()
        for meter in PeakMemory._active:  # the reset below must not hide what enclosing meters saw
            meter.peak_bytes = max(meter.peak_bytes, peak)
        if self.resettable:
            self._reset()
        self.start_bytes = self._current()
        self.peak_bytes = self._peak()
        PeakMemory._active.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        PeakMemory._active.remove(self)
        self.peak_bytes = max(self.peak_bytes, self._peak())
        for meter in PeakMemory._active:
            meter.peak_bytes = max(meter.peak_bytes, self.peak_bytes)


class RunMemory:
    """What the teacher-forced passes of one run used: the peak memory over its steps, and the tokens per
    chunk that the pass plans chose (a memory budget chooses them), for the run's record.

    Args:
        device: where the run computes.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.chunk_tokens: set[int] = set()
        self.plans: list[Any] = []

    @contextmanager
    def step(self) -> Iterator[None]:
        """Measure one step's peak; afterwards, note the tokens per chunk of the plans it made (see :meth:`planned`)."""
        with PeakMemory(self.device) as meter:
            yield
        self.peak_bytes = max(self.peak_bytes, meter.peak_bytes)
        self.chunk_tokens.update(plan.chunk_tokens for plan in self.plans if plan.chunk_tokens is not None)
        self.plans.clear()

    def planned(self, plan: Any) -> Any:
        """Remember a pass plan (anything with ``chunk_tokens``) made during the current step; returns it."""
        self.plans.append(plan)
        return plan

    def record(self) -> dict[str, Any]:
        """The run's memory record: peak in GB, what was measured, the smallest tokens per chunk used."""
        return {
            "peak_gb": round(self.peak_bytes / 2**30, 3),
            "measured": "allocated CUDA tensors" if self.device.type == "cuda" else "the process's resident set",
            "chunk_tokens": min(self.chunk_tokens) if self.chunk_tokens else None,
        }
