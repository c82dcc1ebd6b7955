"""Export a steered model as a plain Hugging Face checkpoint.

LoRA merges first; neuron, head and sub-layer gates fold exactly into the projection weights.
Gates that cannot fold (residual-stream coordinates, later SAE features) travel beside the
checkpoint in ``steering.safetensors`` and are re-applied by :func:`load_steered`. The card
``steering_card.json`` says which gates were folded and which need the loader. Writing is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ipg_lightning.folding import FOLDABLE_FAMILIES, fold_gates_into_weights
from ipg_lightning.gates import ComponentGates
from ipg_lightning.outputs import atomic_directory, atomic_write_json
from ipg_lightning.sites import discover_sites, parse_site_name

STEERING_FILE = "steering.safetensors"
CARD_FILE = "steering_card.json"


def _changed(gates: ComponentGates) -> dict[str, float]:
    values = {}
    for name, site in gates.sites.items():
        for index, value in enumerate(gates.gate(name).detach().tolist()):
            if value != 1.0:
                values[site.component_name(index)] = value
    return values


def split_gates(gates: ComponentGates) -> tuple[ComponentGates, ComponentGates]:
    """Split into (foldable, needs-loader) gate sets, each holding only sites with a gate != 1."""
    parts: tuple[list, list] = ([], [])
    for name, site in gates.sites.items():
        if torch.all(gates.gate(name) == 1):
            continue
        parts[site.family not in FOLDABLE_FAMILIES].append(site)
    foldable, unfoldable = ComponentGates(parts[0]), ComponentGates(parts[1])
    for subset in (foldable, unfoldable):
        for name in subset.sites:
            subset.set_site(name, gates.gate(name).detach())
    return foldable, unfoldable


def export_steered_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gates: ComponentGates,
    output_dir: str | Path,
    source: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge any LoRA adapter, fold what folds, and save checkpoint, tokenizer and card atomically.

    ``model`` is modified in place (merged and folded). Returns the steering card.
    """
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
    foldable, unfoldable = split_gates(gates)
    folded = fold_gates_into_weights(model, foldable) if foldable.sites else []
    card = {
        "format": "ipg_lightning steering card v1",
        "source": source or {},
        "lora_merged": merged,
        "folded_sites": folded,
        "loader_sites": list(unfoldable.sites),
        "gates": _changed(gates),
        "metrics": metrics,
        "how_to_load": (
            "AutoModelForCausalLM.from_pretrained(path) reproduces the steered model"
            if not unfoldable.sites
            else "ipg_lightning.load_steered(path): residual-stream gates cannot fold into weights and are "
            f"re-applied from {STEERING_FILE}; plain from_pretrained gives the model without them"
        ),
    }
    with atomic_directory(output_dir, overwrite=overwrite, kind="steered model export") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if unfoldable.sites:
            save_file({name: unfoldable.gate(name).detach().float().contiguous() for name in unfoldable.sites},
                      str(staging / STEERING_FILE))
        atomic_write_json(staging / CARD_FILE, card)
    return card


def load_steered(path: str | Path, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load an exported checkpoint and re-apply its unfoldable gates (if any) for good.

    >>> # model = ipg_lightning.load_steered("outputs/steered")   # one line, any device/dtype kwargs
    """
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    steering_file = path / STEERING_FILE
    if steering_file.is_file():
        values = load_file(str(steering_file))
        sites = []
        for site_name in values:
            family, layer = parse_site_name(site_name)
            sites.extend(discover_sites(model, [family], [layer]))
        gates = ComponentGates(sites)
        for name, vector in values.items():
            gates.set_site(name, vector)
        # The hooks hold the gates (not registered as a submodule, so a re-save stays plain) and move
        # them to each activation's device, so model.to(...) keeps working.
        gates.install(model)
    return model.eval()


def read_card(path: str | Path) -> dict[str, Any]:
    """The steering card of an exported checkpoint."""
    card = Path(path) / CARD_FILE
    if not card.is_file():
        raise FileNotFoundError(f"{path} has no {CARD_FILE}; was it written by `ipg export`?")
    return json.loads(card.read_text())
