"""Export a steered model as a plain Hugging Face checkpoint.

LoRA merges first; neuron, head and sub-layer gates fold exactly into the projection weights.
Gates that cannot fold (residual-stream coordinates, later SAE features) travel beside the
checkpoint in ``steering.safetensors`` and are re-applied by :func:`load_steered`. Such an export
says so where plain Hugging Face tooling looks: a ``README.md`` model card and an
``ipg_lightning_steering`` entry in ``config.json``. The card ``steering_card.json`` says which gates
were folded and which need the loader, and keeps the card of the export it was made from.

A model loaded from an export by :func:`load_steered` carries its unfolded gates; exporting it again
keeps them, multiplied with any new gates on the same sites (gates compose exactly). Writing is atomic.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ipg_lightning.folding import FOLDABLE_FAMILIES, fold_gates_into_weights
from ipg_lightning.gates import ComponentGates, combined_gates
from ipg_lightning.identity import IN_MEMORY_MODEL, model_identity
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir
from ipg_lightning.sites import Site, discover_sites, parse_site_name, unwrap_model

STEERING_FILE = "steering.safetensors"
CARD_FILE = "steering_card.json"
MODEL_CARD_FILE = "README.md"
#: ``config.json`` entry of an export whose gates need :func:`load_steered`.
CONFIG_MARKER = "ipg_lightning_steering"
_CARRIED_GATES = "_ipg_steering_gates"


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
        parts[site.family not in FOLDABLE_FAMILIES].append(site)
    foldable, unfoldable = ComponentGates(parts[0]), ComponentGates(parts[1])
    for subset in (foldable, unfoldable):
        for name in subset.sites:
            subset.set_site(name, gates.gate(name).detach())
    return foldable, unfoldable


def carried_gates(model: nn.Module) -> ComponentGates | None:
    """The unfolded gates a model loaded by :func:`load_steered` carries (applied by its hooks), if any."""
    return vars(unwrap_model(model)).get(_CARRIED_GATES)


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
) -> dict[str, Any]:
    """Merge any LoRA adapter, fold what folds, and save checkpoint, tokenizer and cards atomically.

    ``model`` is modified in place (merged and folded). Gates it carries from an earlier export are
    kept (multiplied with ``gates`` where both act on a site). Returns the steering card.
    """
    check_output_dir(output_dir, overwrite)  # before merging and folding change the model
    source = dict(source or {})
    source_dir = _source_directory(model)
    carried = carried_gates(model)
    name = source.get("model") or source.get("path") or str(source_dir or IN_MEMORY_MODEL)
    merged = hasattr(model, "merge_and_unload")
    if merged:
        model = model.merge_and_unload()
    combined = combined_gates(carried, gates)
    foldable, unfoldable = split_gates(combined)
    folded = fold_gates_into_weights(model, foldable) if foldable.sites else []
    card = {
        "format": "ipg_lightning steering card v2",
        "source": source,
        "model_identity": model_identity(model, name),
        "lora_merged": merged,
        "folded_sites": folded,
        "loader_sites": list(unfoldable.sites),
        "gates": _changed(gates),
        "carried_gates": _changed(carried),
        "effective_gates": _changed(combined),
        "metrics": metrics,
        "how_to_load": (
            "AutoModelForCausalLM.from_pretrained(path) reproduces the steered model"
            if not unfoldable.sites
            else "ipg_lightning.load_steered(path): residual-stream gates cannot fold into weights and are "
            f"re-applied from {STEERING_FILE}; plain from_pretrained gives the model without them"
        ),
        "previous": read_card(source_dir) if source_dir and (source_dir / CARD_FILE).is_file() else None,
    }
    source_card = (source_dir / MODEL_CARD_FILE).read_text(encoding="utf-8") if source_dir and (source_dir / MODEL_CARD_FILE).is_file() else None
    config = model.config
    with atomic_directory(output_dir, overwrite=overwrite, kind="steered model export") as staging:
        try:
            if unfoldable.sites:
                setattr(
                    config,
                    CONFIG_MARKER,
                    {"loader": "ipg_lightning.load_steered", "steering_file": STEERING_FILE, "unfolded_sites": list(unfoldable.sites)},
                )
            elif hasattr(config, CONFIG_MARKER):
                delattr(config, CONFIG_MARKER)
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            if hasattr(config, CONFIG_MARKER):
                delattr(config, CONFIG_MARKER)
        tokenizer.save_pretrained(staging)
        if unfoldable.sites:
            # The sites travel with the gates (module paths included), so loading needs no architecture table.
            sites = {name: asdict(site) for name, site in unfoldable.sites.items()}
            save_file(
                {name: unfoldable.gate(name).detach().float().cpu().contiguous() for name in unfoldable.sites},
                str(staging / STEERING_FILE),
                metadata={"sites": json.dumps(sites)},
            )
        atomic_write_json(staging / CARD_FILE, card)
        atomic_write_text(staging / MODEL_CARD_FILE, steering_model_card(card, source_card))
    return card


def _split_front_matter(text: str) -> tuple[list[str], str]:
    """The YAML front matter lines of a model card (without the fences), and the rest."""
    match = re.match(r"---\n(.*?)\n---[ \t]*(?:\n|$)", text, flags=re.DOTALL)
    return (match[1].splitlines(), text[match.end() :]) if match else ([], text)


def steering_model_card(card: dict[str, Any], source_card: str | None = None, shown: int = 20) -> str:
    """The ``README.md`` of an export: how to load it, what was steered, and the source model's card."""
    needs_loader = bool(card["loader_sites"])
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
            f"> **Load with `ipg_lightning.load_steered(path)`.** Gates on {', '.join(card['loader_sites'])} cannot be",
            f"> folded into weights; they are in `{STEERING_FILE}`. Plain `AutoModelForCausalLM.from_pretrained(path)`",
            "> loads the model **without** them (`config.json` marks this under `ipg_lightning_steering`).",
            "",
        ]
    else:
        lines += ["`AutoModelForCausalLM.from_pretrained(path)` reproduces the steered model: every gate is folded into the weights.", ""]
    lines += [
        f"Exported by ipg_lightning from {card['source'].get('kind', 'a steered model')} steering. "
        f"Folded: {', '.join(card['folded_sites']) or 'nothing'}. LoRA merged: {card['lora_merged']}.",
        "",
    ]
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


def read_steering_gates(path: str | Path, model: nn.Module) -> ComponentGates | None:
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
            described = json.loads((handle.metadata() or {}).get("sites", "{}"))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{steering_file} cannot be read ({error}); re-export the model") from None
    sites = []
    for site_name in values:
        if site_name in described:
            sites.append(Site(**described[site_name]))
        else:
            family, layer = parse_site_name(site_name)
            sites.extend(discover_sites(model, [family], [layer]))
    gates = ComponentGates(sites)
    for name, vector in values.items():
        if vector.shape != gates.gate(name).shape:
            raise ValueError(f"{steering_file}: {name} has {vector.numel()} gates, the model has {gates.gate(name).numel()}")
        gates.set_site(name, vector)
    return gates


def load_steered(path: str | Path, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load an exported checkpoint and re-apply its unfoldable gates (if any) for good.

    >>> # model = ipg_lightning.load_steered("outputs/steered")   # one line, any device/dtype kwargs
    """
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    gates = read_steering_gates(path, model)
    if gates is not None:
        # The hooks hold the gates (kept off the module tree, so a re-save stays plain) and move
        # them to each activation's device, so model.to(...) keeps working. A later export keeps them.
        gates.install(model)
        vars(model)[_CARRIED_GATES] = gates
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
