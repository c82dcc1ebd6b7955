"""Steering vectors on disk: one safetensors file with their sites, strength, model and provenance.

The tensors are the vectors, one per site under its hook name; the metadata holds the file format,
``alpha``, each site's description, the identity of the model they were built on
(:func:`~ipg_lightning.model.identity.model_identity`) and their provenance (where they come from:
a contrast of the model's own trajectories, an SAE feature's decoder direction, training). Reading
checks all of it against the model they are applied to, and never runs code from the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import check_same_model, model_identity
from ipg_lightning.model.sites import find_site, unwrap_model
from ipg_lightning.outputs import atomic_write_bytes, check_writable
from ipg_lightning.vectors.additive import POSITIONS, SteeringVectors

#: The ``format`` entry of a steering-vector file's metadata.
VECTOR_FORMAT = "ipg_lightning.steering_vectors"
VECTOR_FORMAT_VERSION = "1"


def save_vectors(vectors: SteeringVectors, path: str | Path, model: nn.Module, model_name: str, overwrite: bool = False) -> Path:
    """Write ``vectors`` (built on ``model``, loaded as ``model_name``) to the safetensors file ``path``, atomically.

    An existing file is replaced only with ``overwrite``, and only if it is a steering-vector file
    (never a model's weights or any other safetensors file).
    """
    path = check_vector_output(path, overwrite)
    tensors = {name: vectors.vector(name).detach().float().cpu().contiguous() for name in vectors.sites}
    metadata = {
        "format": VECTOR_FORMAT,
        "version": VECTOR_FORMAT_VERSION,
        "width": str(vectors.width),
        "alpha": repr(vectors.alpha),
        "sites": json.dumps({name: site.description() for name, site in vectors.sites.items()}),
        "model": json.dumps(model_identity(model, model_name)),
        "provenance": json.dumps(vectors.provenance),
        "positions": vectors.positions,
    }
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def check_vector_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, a vector file that cannot be written at ``path`` or must not be replaced there."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"A steering-vector file is a .safetensors file, got {path}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another file, or set overwrite to replace an earlier vector file")
        try:
            read_vector_metadata(path)
        except ValueError:
            raise FileExistsError(
                f"{path} is not a steering-vector file of this library, so overwrite does not replace it; choose another file"
            ) from None
    return check_writable(path)


def read_vector_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a steering-vector file, decoded (``alpha`` a float, ``sites``, ``model`` and ``provenance`` dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No steering-vector file at {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if raw.get("format") != VECTOR_FORMAT:
        raise ValueError(f"{path} is not a steering-vector file of this library (its format is {raw.get('format')!r}, not {VECTOR_FORMAT!r})")
    if raw.get("version") != VECTOR_FORMAT_VERSION:
        raise ValueError(
            f"{path} has steering-vector format version {raw.get('version')!r}; this version of ipg_lightning reads {VECTOR_FORMAT_VERSION!r}"
        )
    try:
        metadata = {
            "width": int(raw["width"]),
            "alpha": float(raw["alpha"]),
            "sites": json.loads(raw["sites"]),
            "model": json.loads(raw["model"]),
            "provenance": json.loads(raw["provenance"]),
            "positions": raw.get("positions", "all"),  # files written before generated-only vectors add everywhere
        }
        sites, model = metadata["sites"], metadata["model"]
        if not math.isfinite(metadata["alpha"]):
            raise ValueError(f"alpha is {metadata['alpha']}")
        if not (isinstance(sites, dict) and sites and all(isinstance(site, dict) for site in sites.values())):
            raise ValueError("sites is not a mapping of site names to descriptions")
        if not (isinstance(model, dict) and model.get("name")):
            raise ValueError("model is not a model identity")
        if not isinstance(metadata["provenance"], dict):
            raise ValueError("provenance is not a mapping")
        if metadata["positions"] not in POSITIONS:
            raise ValueError(f"positions is {metadata['positions']!r}, not one of {list(POSITIONS)}")
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} has damaged metadata ({type(error).__name__}: {error}); write the vectors again") from None
    return metadata


def load_vectors(
    path: str | Path, model: nn.Module, model_name: str = "the model", allow_other_model: bool = False, architecture: ArchitectureSpec | None = None
) -> SteeringVectors:
    """The steering vectors in ``path``, checked against ``model`` (plain or PEFT-wrapped).

    Refused in one line: a file of another format, a file built on a model of another shape (unless
    ``allow_other_model``), a site the model does not have or has elsewhere, a vector of the wrong
    width, and non-finite values. ``architecture`` declares the module paths of a decoder that is not built in.
    """
    metadata = read_vector_metadata(path)
    check_same_model(metadata["model"], model, model_name, f"The steering vectors in {path}", allow_other_model)
    width = unwrap_model(model).config.hidden_size
    if metadata["width"] != width:
        raise ValueError(f"The steering vectors in {path} have width {metadata['width']}, but the model's hidden_size is {width}")
    values = load_file(str(path))
    if set(values) != set(metadata["sites"]):
        raise ValueError(f"{path} is damaged: its tensors {sorted(values)} do not match the sites it describes {sorted(metadata['sites'])}")
    sites = []
    for name, described in metadata["sites"].items():
        site = find_site(model, name, architecture)
        if site.module_path != described.get("module_path"):
            raise ValueError(
                f"The steering vector for {name} in {path} was added at {described.get('module_path')}, "
                f"but that site is {site.module_path} in this model: it was built for another architecture"
            )
        sites.append(site)
    vectors = SteeringVectors(sites, width, alpha=metadata["alpha"], provenance=metadata["provenance"], positions=metadata["positions"])
    for name, value in values.items():
        if value.shape != (width,):
            raise ValueError(f"{path} is damaged: the vector for {name} has shape {tuple(value.shape)}, not ({width},)")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path} holds non-finite values (NaN or inf) in the vector for {name}; build the vectors again")
        vectors.set_vector(name, value)
    return vectors
