"""Which model an artefact belongs to, so that reports and gates are never applied to another one.

Component indices only mean something in the model they were computed on: neuron 117 of block 3 is
another unit, or none at all, in a model of another shape. Reports, steering checkpoints, exports
and evaluation metrics record a :func:`model_identity` (the model's name, a hash of the
configuration entries that fix its shape, and its site sizes), and :func:`check_same_model`
refuses to apply one to a model of another shape. Models of the same shape (a fine-tune, a copy)
pass: their component indices name the same units.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ipg_lightning.model.families import FAMILIES, UnsupportedArchitectureError
from ipg_lightning.model.loading import model_directory
from ipg_lightning.model.sites import discover_sites, unwrap_model

log = logging.getLogger(__name__)

#: How a model handed over in Python (not loaded by name) is named in reports and cards.
IN_MEMORY_MODEL = "in-memory model"

#: Configuration entries that set how many components each site has and how they are laid out.
#: Other entries (context length, rope scaling, dropout, token ids, dtypes) leave every component
#: index meaning the same unit, so a context-extended or re-saved copy of a model keeps its identity.
_SHAPE_CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "num_local_experts",
    "num_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts_per_tok",
    "parallel_attn",
    "use_parallel_residual",
)


class ModelMismatchError(ValueError):
    """An artefact computed on one model applied to another; the message gives both identities."""


def config_hash(config: Any) -> str:
    """A short hash of the configuration entries that fix the model's shape (see :data:`_SHAPE_CONFIG_KEYS`)."""
    values = config.to_dict()
    entries = {key: values[key] for key in _SHAPE_CONFIG_KEYS if values.get(key) is not None}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()[:16]


def site_sizes(model: nn.Module) -> dict[str, int]:
    """Components per site of each family (in the first block); families the model has no site of are left out."""
    sizes = {}
    for family in FAMILIES:
        try:
            sites = discover_sites(model, [family], [0])
        except (UnsupportedArchitectureError, ValueError, TypeError):
            continue
        sizes[family] = sites[0].size
    return sizes


def model_identity(model: nn.Module, name: str) -> dict[str, Any]:
    """What identifies ``model`` (loaded from ``name``) for reports, checkpoints, exports and metrics."""
    config = unwrap_model(model).config
    return {
        "name": name,
        "model_type": getattr(config, "model_type", None),
        "config_hash": config_hash(config),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "site_sizes": site_sizes(model),
    }


def same_model_name(first: Any, second: Any) -> bool:
    """Whether two recorded model names are the same model: equal, or the same local directory (a shipped
    model's name, ``tiny-reasoner``, is its directory)."""
    if first == second:
        return True
    if not (isinstance(first, str) and isinstance(second, str)):
        return False
    first, second = Path(model_directory(first)), Path(model_directory(second))
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def describe(identity: Mapping[str, Any]) -> str:
    """One line, e.g. ``tiny:llama (llama, 2 blocks, width 64, config 3f2a...)``."""
    return (
        f"{identity.get('name')} ({identity.get('model_type')}, {identity.get('num_layers')} blocks, "
        f"width {identity.get('hidden_size')}, config {identity.get('config_hash')})"
    )


def check_same_model(recorded: Mapping[str, Any] | None, model: nn.Module, name: str, what: str, allow_other_model: bool = False) -> None:
    """Refuse to apply ``what`` (computed on the ``recorded`` model) to ``model`` if their architectures differ.

    Artefacts written before identities were recorded (``recorded`` is None) cannot be checked: a
    warning says so, and the caller still checks their sizes. ``allow_other_model`` turns a refusal
    into a logged warning.
    """
    if not recorded:
        log.warning("%s records no model identity (an older version wrote it): it cannot be checked against %s, only its sizes", what, name)
        return
    check_same_identity(recorded, model_identity(model, name), what, allow_other_model)


def check_same_identity(
    recorded: Mapping[str, Any], actual: Mapping[str, Any], what: str, allow_other_model: bool = False, target: str = "the model"
) -> None:
    """Refuse ``what`` (computed on the ``recorded`` model) for ``target`` (the ``actual`` model) if their architectures differ.

    See :func:`check_same_model`; ``target`` names the other side in the message.
    """
    recorded_sites, actual_sites = recorded.get("site_sizes") or {}, actual.get("site_sizes") or {}
    same_sites = all(actual_sites.get(family, size) == size for family, size in recorded_sites.items())
    if recorded.get("config_hash") == actual.get("config_hash") and same_sites:
        if recorded.get("name") != actual.get("name"):
            log.info("%s was computed on %s; applying it to %s, which has the same architecture", what, recorded.get("name"), actual.get("name"))
        return
    message = f"{what} was computed on {describe(recorded)}, but {target} is {describe(actual)}: its component indices would mean other units"
    if allow_other_model:
        log.warning("%s; going on because allow_other_model is set", message)
        return
    raise ModelMismatchError(f"{message}. Use one made for this model, or set allow_other_model if they share their architecture")
