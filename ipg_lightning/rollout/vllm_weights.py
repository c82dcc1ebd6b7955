"""That the vLLM engine, which loads the model's weights from its directory, runs the weights the Hugging Face model holds.

The engine is started from the directory the Hugging Face model was loaded from. Two things can
make them differ: the files changed on disk (a model saved again at the same path), which
:func:`weight_files_fingerprint` puts in the engine's key so a new engine starts, and the weights
changed in memory (folded, fine-tuned, loaded from elsewhere), which :class:`WeightsWatch` finds by
comparing every tensor with the file's once per model object, and again only after a parameter was
replaced or changed in place (torch's version counters; a write through ``.data`` is not seen).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ipg_lightning.model.sites import unwrap_model

#: Weight files the engine may read (``*.bin`` files are never opened here: they are pickles).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def weight_files_fingerprint(directory: str) -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of each weight file in ``directory``: another value means other weights on disk."""
    files = sorted(path for pattern in WEIGHT_PATTERNS for path in Path(directory).glob(pattern))
    return tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files)


def _versions(model: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Each parameter's identity, storage and in-place version (writes through ``.data`` are not seen)."""
    return tuple((id(parameter), parameter.data_ptr(), parameter._version) for parameter in unwrap_model(model).parameters())


def differing_tensor(model: nn.Module, directory: str, skip: frozenset[str] = frozenset()) -> str | None:
    """The first tensor of ``model`` that differs from the same tensor in ``directory``'s safetensors files, if any.

    Each stored tensor is read in turn and cast to the model's dtype (as the engine loads it); files
    named in ``skip`` are not read. A parameter the files do not hold (other names, ``.bin`` files
    only) is reported too: what cannot be compared is not taken as equal.
    """
    root = unwrap_model(model)
    state = root.state_dict()
    unseen = {name for name, _ in root.named_parameters()}  # tied weights appear once
    for path in sorted(Path(directory).glob("*.safetensors")):
        if path.name in skip:
            continue
        with safe_open(str(path), framework="pt") as stored:
            for name in stored.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = state.get(name)
                if tensor is None:
                    continue
                unseen.discard(name)
                on_disk = stored.get_tensor(name)
                if on_disk.shape != tensor.shape or not torch.equal(on_disk.to(tensor.dtype), tensor.detach().cpu()):
                    return name
    return f"{min(unseen)} (not in the directory's safetensors files)" if unseen else None


class WeightsWatch:
    """Remembers, per Hugging Face model object, that its weights were found equal to the engine's directory.

    Args:
        directory: the directory the engine loaded.
        skip: files there that are not the model's weights (an export's steering file).
    """

    def __init__(self, directory: str, skip: frozenset[str]) -> None:
        self.directory = directory
        self.skip = skip
        self.checked: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int, int], ...]] = weakref.WeakKeyDictionary()

    def differing_tensor(self, model: nn.Module) -> str | None:
        """The first tensor of ``model`` that differs from the directory's, or None; compared again only after an in-place change."""
        root = unwrap_model(model)
        versions = _versions(root)
        if self.checked.get(root) == versions:
            return None
        differing = differing_tensor(root, self.directory, self.skip)
        if differing is None:
            self.checked[root] = versions
        return differing
