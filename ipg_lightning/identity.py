"""Which model an artefact belongs to, so that reports and gates are never applied to another one.

Component indices only mean something in the model they were computed on: neuron 117 of block 3 is
another unit, or none at all, in a model of another shape. Reports, steering checkpoints, exports
and evaluation metrics record a :func:`model_identity` (the model's name, a hash of the
configuration entries that define its architecture, and its site sizes), and
:func:`check_same_model` refuses to apply one to a model whose architecture differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ipg_lightning.sites import SITE_FAMILIES, UnsupportedArchitectureError, discover_sites, unwrap_model

log = logging.getLogger(__name__)

#: How a model handed over in Python (not loaded by name) is named in reports and cards.
IN_MEMORY_MODEL = "in-memory model"

#: Configuration entries that do not change what a component index means (names, dtypes,
#: runtime flags, special token ids, our own export marker).
_VOLATILE_CONFIG_KEYS = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "ipg_lightning_steering",
})


class ModelMismatchError(ValueError):
    """An artefact computed on one model applied to another; the message gives both identities."""


def config_hash(config: Any) -> str:
    """A short hash of the configuration entries that define the architecture (see :data:`_VOLATILE_CONFIG_KEYS`)."""
    entries = {key: value for key, value in config.to_dict().items()
               if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()[:16]


def site_sizes(model: nn.Module) -> dict[str, int]:
    """Components per site of each family (in the first block), or ``{}`` where sites cannot be found."""
    try:
        return {site.family: site.size for site in discover_sites(model, SITE_FAMILIES, [0])}
    except (UnsupportedArchitectureError, ValueError, TypeError):
        return {}


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


def describe(identity: Mapping[str, Any]) -> str:
    """One line, e.g. ``tiny:llama (llama, 2 blocks, width 64, config 3f2a...)``."""
    return (f"{identity.get('name')} ({identity.get('model_type')}, {identity.get('num_layers')} blocks, "
            f"width {identity.get('hidden_size')}, config {identity.get('config_hash')})")


def check_same_model(recorded: Mapping[str, Any] | None, model: nn.Module, name: str, what: str,
                     allow_other_model: bool = False) -> None:
    """Refuse to apply ``what`` (computed on the ``recorded`` model) to ``model`` if their architectures differ.

    Artefacts written before identities were recorded (``recorded`` is None) pass; the caller still
    checks their sizes. ``allow_other_model`` turns a refusal into a logged warning.
    """
    if not recorded:
        return
    actual = model_identity(model, name)
    if recorded.get("config_hash") == actual["config_hash"]:
        if recorded.get("name") != name:
            log.info("%s was computed on %s; applying it to %s, which has the same architecture", what, recorded.get("name"), name)
        return
    message = (f"{what} was computed on {describe(recorded)}, but the model is {describe(actual)}: its component "
               "indices would mean other units")
    if allow_other_model:
        log.warning("%s; going on because allow_other_model is set", message)
        return
    raise ModelMismatchError(f"{message}. Use one made for this model, or set allow_other_model if they share their architecture")
