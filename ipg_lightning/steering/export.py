"""Export a steered model as a plain Hugging Face checkpoint.

LoRA and trained weight slices merge first; neuron, head and sub-layer gates fold exactly into the projection weights.
Gates that cannot fold (residual-stream coordinates, gates after a norm, SAE features with their
SAE) travel beside the checkpoint in ``steering.safetensors`` and are re-applied by :func:`~ipg_lightning.gates.exported.load_steered`. Such an export
says so where plain Hugging Face tooling looks: a ``README.md`` model card and an
``ipg_lightning_steering`` entry in ``config.json``. The card ``steering_card.json`` says which gates
were folded and which need the loader, and keeps the card of the export it was made from.

A model loaded from an export by :func:`~ipg_lightning.gates.exported.load_steered` carries its unfolded gates; exporting it again
keeps them, multiplied with any new gates on the same sites (gates compose exactly). Writing is atomic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.gates.component_gates import ComponentGates, combined_gates
from ipg_lightning.gates.exported import (
    CARD_FILE,
    CONFIG_MARKER,
    MODEL_CARD_FILE,
    SAE_KEY,
    STEERING_FILE,
    VECTORS_FILE,
    carried_gates,
    carried_vectors,
    read_card,
)
from ipg_lightning.gates.folding import fold_gates_into_weights
from ipg_lightning.model.identity import IN_MEMORY_MODEL, model_identity
from ipg_lightning.model.sites import edits_block_output, unwrap_model
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir
from ipg_lightning.steering.finetune.lora import adapted_weights
from ipg_lightning.steering.finetune.slices import merge_weight_slices
from ipg_lightning.vectors import SteeringVectors, save_vectors
from ipg_lightning.vectors.folding import VectorFold, fold_vectors_into_biases


def _changed(gates: ComponentGates | None) -> dict[str, float]:
    values = {}
    for name, site in gates.sites.items() if gates is not None else ():
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
        parts[not site.foldable].append(site)
    foldable, unfoldable = ComponentGates(parts[0]), ComponentGates(parts[1])
    for subset in (foldable, unfoldable):
        for name in subset.sites:
            subset.set_site(name, gates.gate(name).detach())
    return foldable, unfoldable


def _source_directory(model: nn.Module) -> Path | None:
    name = getattr(unwrap_model(model).config, "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def export_steered_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    gates: ComponentGates | None,
    output_dir: str | Path,
    source: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
    vectors: SteeringVectors | None = None,
) -> dict[str, Any]:
    """Merge any LoRA adapter or trained weight slices, fold what folds, and save checkpoint, tokenizer and cards atomically.

    ``model`` is modified in place (merged and folded). Gates it carries from an earlier export are
    kept (multiplied with ``gates`` where both act on a site). ``vectors`` (added after the gates)
    fold into projection biases where that is exact (:mod:`ipg_lightning.vectors.folding`); the rest
    travel in ``steering_vectors.safetensors``. Returns the steering card.
    """
    check_output_dir(output_dir, overwrite)  # before merging and folding change the model
    if carried_vectors(model) is not None and (gates is not None or vectors is not None):
        raise ValueError(
            "This model carries steering vectors from an earlier export, which new steering would not compose with exactly: "
            "export from the base model with all the steering at once"
        )
    source = dict(source or {})
    source_dir = _source_directory(model)
    carried = carried_gates(model)
    name = source.get("model") or source.get("path") or str(source_dir or IN_MEMORY_MODEL)
    merged = hasattr(model, "merge_and_unload")
    adapted = adapted_weights(model) if merged else None
    if merged:
        model = model.merge_and_unload()
    sliced = merge_weight_slices(model)
    combined = combined_gates(carried, gates)
    foldable, unfoldable = split_gates(combined)
    folded = fold_gates_into_weights(model, foldable) if foldable.sites else []
    vectors = vectors if vectors is not None else carried_vectors(model)
    # a block output whose gates stay hooks scales before its vector is added: that vector stays a hook too
    hooked_outputs = {f"blocks.{site.layer}.hook_resid_post" for site in unfoldable.sites.values() if edits_block_output(site)}
    vector_fold = _fold_vectors(model, tokenizer, vectors, hooked_outputs)
    loader_vectors = list(vector_fold.carried.sites) if vector_fold.carried is not None else []
    card = {
        "format": "ipg_lightning steering card v2",
        "source": source,
        "model_identity": model_identity(model, name),
        "lora_merged": merged,
        "lora_weights": adapted,
        "weight_slices_merged": sliced,
        "folded_sites": folded,
        "loader_sites": list(unfoldable.sites),
        "carried_saes": [name for name, site in unfoldable.sites.items() if site.sae is not None],
        "folded_vectors": vector_fold.folded,
        "loader_vectors": loader_vectors,
        "vector_bias_flags": vector_fold.config_flags,
        "vectors": None if vectors is None else {"alpha": vectors.alpha, "norms": vectors.norms(), "provenance": vectors.provenance},
        "gates": _changed(gates),
        "carried_gates": _changed(carried),
        "effective_gates": _changed(combined),
        "metrics": metrics,
        "how_to_load": (
            "AutoModelForCausalLM.from_pretrained(path) reproduces the steered model"
            if not (unfoldable.sites or loader_vectors)
            else f"ipg_lightning.load_steered(path): gates or steering vectors on {', '.join([*unfoldable.sites, *loader_vectors])} cannot "
            f"fold into weights and are re-applied from {STEERING_FILE} (with the SAEs of SAE features) and {VECTORS_FILE}; "
            "plain from_pretrained gives the model without them"
        ),
        "previous": read_card(source_dir) if source_dir and (source_dir / CARD_FILE).is_file() else None,
    }
    source_card = (source_dir / MODEL_CARD_FILE).read_text(encoding="utf-8") if source_dir and (source_dir / MODEL_CARD_FILE).is_file() else None
    with atomic_directory(output_dir, overwrite=overwrite, kind="steered model export") as staging:
        _save_marked_checkpoint(model, staging, [*unfoldable.sites, *loader_vectors])
        tokenizer.save_pretrained(staging)
        if unfoldable.sites:
            _save_steering_file(unfoldable, staging / STEERING_FILE)
        if vector_fold.carried is not None:
            save_vectors(vector_fold.carried, staging / VECTORS_FILE, model, name)
        atomic_write_json(staging / CARD_FILE, card)
        atomic_write_text(staging / MODEL_CARD_FILE, steering_model_card(card, source_card))
    return card


def _fold_vectors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, vectors: SteeringVectors | None, keep: set[str]) -> VectorFold:
    """Fold ``vectors`` (but those of ``keep``) into biases where exact, checked on a short probe text."""
    if vectors is None:
        return VectorFold([], None, [])
    device = next(unwrap_model(model).parameters()).device
    probe = tokenizer("The answer is 42, since 6 times 7 is 42.", add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    return fold_vectors_into_biases(model, vectors, probe, keep=keep)


def _save_marked_checkpoint(model: nn.Module, directory: Path, unfolded: list[str]) -> None:
    """Save the weights; a model with unfolded gates or vectors gets the ``config.json`` entry that says it needs the loader."""
    config = model.config
    try:
        if unfolded:
            marker = {"loader": "ipg_lightning.load_steered", "steering_file": STEERING_FILE, "unfolded_sites": unfolded}
            setattr(config, CONFIG_MARKER, marker)
        elif hasattr(config, CONFIG_MARKER):
            delattr(config, CONFIG_MARKER)
        model.save_pretrained(directory, safe_serialization=True)
    finally:  # the marker describes the saved files, never the model in memory
        if hasattr(config, CONFIG_MARKER):
            delattr(config, CONFIG_MARKER)


def _save_steering_file(unfoldable: ComponentGates, path: Path) -> None:
    """The unfolded gates, with their sites (module paths included) so loading needs no architecture table,
    and the SAE of each SAE-feature site (its weights under ``<site>/sae/<name>``, its config in the metadata)."""
    sites = {name: site.description() for name, site in unfoldable.sites.items()}
    values = {name: unfoldable.gate(name).detach().float().cpu().contiguous() for name in unfoldable.sites}
    saes = {}
    for name, site in unfoldable.sites.items():
        if site.sae is not None:
            saes[name] = {**site.sae.config(), "source": site.sae.source}
            values.update({f"{name}{SAE_KEY}{key}": tensor.detach().float().cpu().contiguous() for key, tensor in site.sae.state_dict().items()})
    save_file(values, str(path), metadata={"sites": json.dumps(sites), "saes": json.dumps(saes)})


def _split_front_matter(text: str) -> tuple[list[str], str]:
    """The YAML front matter lines of a model card (without the fences), and the rest."""
    match = re.match(r"---\n(.*?)\n---[ \t]*(?:\n|$)", text, flags=re.DOTALL)
    return (match[1].splitlines(), text[match.end() :]) if match else ([], text)


def steering_model_card(card: dict[str, Any], source_card: str | None = None, shown: int = 20) -> str:
    """The ``README.md`` of an export: how to load it, what was steered, and the source model's card."""
    unfolded = [*card["loader_sites"], *card.get("loader_vectors", [])]
    needs_loader = bool(unfolded)
    source_meta, source_body = _split_front_matter(source_card or "")
    licence = [line for line in source_meta if line.startswith("license")]  # the weights keep their licence
    lines = [
        "---",
        "library_name: transformers",
        *licence,
        "tags: [ipg_lightning, steering]",
        "---",
        "",
        f"# Steered {Path(card['model_identity']['name']).name or card['model_identity']['name']}",
        "",
    ]
    if needs_loader:
        lines += [
            f"> **Load with `ipg_lightning.load_steered(path)`.** Gates or steering vectors on {', '.join(unfolded)} cannot be",
            f"> folded into weights; they are in `{STEERING_FILE}` and `{VECTORS_FILE}`. Plain `AutoModelForCausalLM.from_pretrained(path)`",
            "> loads the model **without** them (`config.json` marks this under `ipg_lightning_steering`).",
            "",
        ]
    else:
        lines += ["`AutoModelForCausalLM.from_pretrained(path)` reproduces the steered model: every gate and vector is folded into the weights.", ""]
    lines += [
        f"Exported by ipg_lightning from {card['source'].get('kind', 'a steered model')} steering. "
        f"Folded: {', '.join([*card['folded_sites'], *card.get('folded_vectors', [])]) or 'nothing'}. LoRA merged: {card['lora_merged']}.",
        "",
    ]
    if card.get("lora_weights"):
        adapted = [*card["lora_weights"]["modules"], *card["lora_weights"]["parameters"]]
        lines += [f"The LoRA adapter sat on {len(adapted)} weights: {', '.join(f'`{name}`' for name in adapted[:shown])}.", ""]
    if card.get("weight_slices_merged"):
        lines += [f"Trained weight slices merged into: {', '.join(f'`{name}`' for name in card['weight_slices_merged'])}.", ""]
    steered = card["effective_gates"]  # new gates times those carried from the source export
    if steered:
        lines += ["| component | gate |", "| --- | --- |"]
        lines += [f"| `{name}` | {value:.4g} |" for name, value in list(steered.items())[:shown]]
        if len(steered) > shown:
            lines.append(f"| ... {len(steered) - shown} more in `{CARD_FILE}` | |")
        lines.append("")
    if card["carried_gates"]:
        lines += [f"Gates carried from the export this one was made from stay in force (see `previous` in `{CARD_FILE}`).", ""]
    if card.get("metrics"):
        lines += ["Measured: " + ", ".join(f"{key} {value:.4g}" for key, value in card["metrics"].items() if isinstance(value, (int, float))), ""]
    if source_body.strip():
        lines += ["## Card of the source model", "", source_body.strip(), ""]
    return "\n".join(lines)
