"""Reading what ``ipg export`` writes: the one-line loader and the steering card.

An export is a plain Hugging Face checkpoint. Gates that fold into weights are already in it; gates
that cannot fold (residual-stream coordinates, SAE features) travel beside it in
``steering.safetensors``, with the module of each site in its metadata and the SAE of each SAE
feature site, and :func:`load_steered` re-applies them; steering vectors that cannot fold into a
projection bias travel in ``steering_vectors.safetensors`` and are added after the gates, as when
exported. ``steering_card.json`` says what was folded and what needs the loader. Writing lives in :mod:`ipg_lightning.steering.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.autoencoder import SparseAutoencoder
from ipg_lightning.model.loading import EXPORT_CARD_FILE, EXPORT_CONFIG_ENTRY, EXPORT_STEERING_FILE, EXPORT_VECTORS_FILE
from ipg_lightning.model.sae_splice import splice_sae
from ipg_lightning.model.sites import Site, find_site, unwrap_model
from ipg_lightning.vectors import SteeringVectors, load_vectors

STEERING_FILE = EXPORT_STEERING_FILE
VECTORS_FILE = EXPORT_VECTORS_FILE
CARD_FILE = EXPORT_CARD_FILE
MODEL_CARD_FILE = "README.md"
#: ``config.json`` entry of an export whose gates need :func:`load_steered`.
CONFIG_MARKER = EXPORT_CONFIG_ENTRY
CARRIED_GATES_ATTRIBUTE = "_ipg_steering_gates"
CARRIED_VECTORS_ATTRIBUTE = "_ipg_steering_vectors"
#: Separates a site's name from its SAE's tensor names in the steering file.
SAE_KEY = "/sae/"


def carried_gates(model: nn.Module) -> ComponentGates | None:
    """The unfolded gates a model loaded by :func:`load_steered` carries (applied by its hooks), if any."""
    return vars(unwrap_model(model)).get(CARRIED_GATES_ATTRIBUTE)


def carried_vectors(model: nn.Module) -> SteeringVectors | None:
    """The steering vectors a model loaded by :func:`load_steered` carries (added by its hooks after its gates), if any."""
    return vars(unwrap_model(model)).get(CARRIED_VECTORS_ATTRIBUTE)


def load_steering_gates(path: str | Path, model: nn.Module) -> ComponentGates | None:
    """The unfoldable gates of an export directory for ``model`` (None if it has none).

    The steering file names each site's module; files written before it did are matched to the model's
    sites by discovery (built-in architectures only).
    """
    path = Path(path)
    steering_file = path / STEERING_FILE
    if not steering_file.is_file():
        if getattr(unwrap_model(model).config, CONFIG_MARKER, None):
            raise FileNotFoundError(f"{path}/config.json says its gates travel in {STEERING_FILE}, which is missing: copy the whole export directory")
        return None
    try:
        values = load_file(str(steering_file))
        with safe_open(str(steering_file), "pt") as handle:
            metadata = handle.metadata() or {}
        described, sae_configs = json.loads(metadata.get("sites", "{}")), json.loads(metadata.get("saes", "{}"))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{steering_file} cannot be read ({error}); re-export the model") from None
    try:
        saes = {name: _carried_sae(name, config, values) for name, config in sae_configs.items()}
        sites = []
        for site_name in [name for name in values if SAE_KEY not in name]:
            if site_name in described:
                sites.append(Site(**described[site_name], sae=saes.get(site_name)))
            else:
                sites.append(find_site(model, site_name))
        missing = [site.name for site in sites if site.kind.sae and site.sae is None]
        if missing:
            raise ValueError(f"no SAE is stored for {missing}")
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{steering_file} cannot be read ({error}); re-export the model") from None
    damaged = [name for name, tensor in values.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if damaged:
        raise ValueError(f"{steering_file} holds non-finite values (NaN or inf) in {damaged[:3]}; re-export the model")
    gates = ComponentGates(sites)
    for site in sites:
        vector = values[site.name]
        if vector.shape != gates.gate(site.name).shape:
            raise ValueError(f"{steering_file}: {site.name} has {vector.numel()} gates, the model has {gates.gate(site.name).numel()}")
        gates.set_site(site.name, vector)
    for sae in saes.values():
        splice_sae(model, sae)
    return gates


def _carried_sae(site_name: str, config: dict[str, Any], values: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """The SAE of an SAE-feature site as the steering file carries it (config in metadata, weights under ``<site>/sae/``)."""
    config = dict(config)
    source = config.pop("source", None)
    sae = SparseAutoencoder(**config)
    prefix = f"{site_name}{SAE_KEY}"
    sae.load_state_dict({key.removeprefix(prefix): tensor for key, tensor in values.items() if key.startswith(prefix)})
    sae.source = source
    return sae.requires_grad_(False)


def load_steered(path: str | Path, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load an exported checkpoint and re-apply its unfoldable gates (if any) for good.

    >>> # model = ipg_lightning.load_steered("outputs/steered")   # one line, any device/dtype kwargs
    """
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if (path / CARD_FILE).is_file():  # an export of this library: its folded weights must be numbers
        damaged = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if damaged:
            raise ValueError(f"the export {path} holds non-finite weights (NaN or inf) in {damaged[:3]}; export it again")
    gates = load_steering_gates(path, model)
    if gates is not None:
        # The hooks hold the gates (kept off the module tree, so a re-save stays plain) and move
        # them to each activation's device, so model.to(...) keeps working. A later export keeps them.
        gates.install(model)
        vars(model)[CARRIED_GATES_ATTRIBUTE] = gates
    if (path / VECTORS_FILE).is_file():  # vectors that could not fold into biases: added after the gates, as when exported
        vectors = load_vectors(path / VECTORS_FILE, model, str(path))
        vectors.install(model)
        vars(model)[CARRIED_VECTORS_ATTRIBUTE] = vectors
    return model.eval()


def read_card(path: str | Path) -> dict[str, Any]:
    """The steering card of an exported checkpoint."""
    card = Path(path) / CARD_FILE
    if not card.is_file():
        raise FileNotFoundError(f"{path} has no {CARD_FILE}; was it written by `ipg export`?")
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{card} is not valid JSON ({error}); re-export the model") from None
