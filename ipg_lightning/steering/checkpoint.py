"""Steering checkpoints: what ``ipg steer`` saves, read back without running any code.

A checkpoint holds only what was trained (gates, vectors, adapter, optimizer state), the hyperparameters as
plain values, and under :data:`STEERING_KEY` the steered component names, the learned vectors' sites and the identity of the
model they were trained on. :func:`read_steering_checkpoint` checks all of that before anything is
built; :func:`~ipg_lightning.steering.learned.load_steering_checkpoint` rebuilds a steered module from it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

STEERING_KEY = "ipg_steering"
#: Settings whose checkpointed optimizer state a resumed run keeps: a new value would be recorded but not used.
RESUME_SETTINGS = ("learning_rate", "train_gates", "weight_slices", "lora")


def check_resume_settings(recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with optimizer settings other than the checkpoint's (its optimizer state would keep the old ones)."""
    changed = [f"{key} {recorded[key]!r} -> {current.get(key)!r}" for key in RESUME_SETTINGS if key in recorded and recorded[key] != current.get(key)]
    if changed:
        raise ValueError(
            f"Cannot resume with changed optimizer settings ({'; '.join(changed)}): the checkpoint's optimizer state keeps "
            "its own, so the new values would be recorded but not used. Resume with the checkpoint's values, or start a new run"
        )


class SteeringCheckpointError(ValueError):
    """A file that is not a readable ``ipg steer`` checkpoint; the message names it and why."""


def read_steering_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``GateSteering`` checkpoint as plain data, never unpickling code, and check its structure.

    Only tensors and plain Python values load (``torch.load(weights_only=True)``); a file holding
    anything else is refused before any of it runs. Non-finite tensors (a diverged run) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Steering checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 writes a zip archive
        raise SteeringCheckpointError(f"{path} cannot be read as a checkpoint: it is not a torch.save archive (truncated, or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SteeringCheckpointError(
            f"{path} holds Python objects beyond tensors and plain values; refusing to unpickle it, since that can run "
            "code. Steering checkpoints written by `ipg steer` hold only plain data"
        ) from None
    except Exception as error:  # torch raises EOFError, RuntimeError, ... for truncated or foreign files
        reason = str(error).split(".")[0].strip() or type(error).__name__
        raise SteeringCheckpointError(f"{path} cannot be read as a checkpoint ({reason}); is it truncated, or not a checkpoint?") from None
    steering = checkpoint.get(STEERING_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(steering, dict):
        raise SteeringCheckpointError(f"{path} is not a GateSteering checkpoint (no {STEERING_KEY!r} entry); use one written by `ipg steer`")
    components = steering.get("components")
    state = checkpoint.get("state_dict")
    vectors = steering.get("vectors", [])
    if not (isinstance(vectors, list) and all(isinstance(site, str) for site in vectors)):
        raise SteeringCheckpointError(f"{path}: {STEERING_KEY}.vectors must be a list of site names")
    if not (isinstance(components, list) and (components or vectors) and all(isinstance(c, str) for c in components)):
        raise SteeringCheckpointError(f"{path}: {STEERING_KEY}.components must be a list of component names, non-empty unless it learned vectors")
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise SteeringCheckpointError(f"{path}: state_dict must map names to tensors")
    if not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise SteeringCheckpointError(f"{path}: hyper_parameters are missing")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SteeringCheckpointError(f"{path}: {key} holds non-finite values (NaN or inf): the run diverged; use an earlier checkpoint")
    return checkpoint


def check_checkpoint_tensors(state: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a checkpoint ``state`` that holds anything beyond the ``trained`` tensors of this run (gates, vectors,
    adapter or slices), lacks part of them, or holds them in other shapes.

    Checkpoints load with ``strict=False`` (they leave the frozen model out), so without this a tensor
    named like a base weight, e.g. the LM head, would silently replace it.
    """
    foreign, missing = sorted(set(state) - set(trained)), sorted(set(trained) - set(state))
    if foreign:
        raise SteeringCheckpointError(
            f"{where} holds tensors that are not trained gates, vectors, adapter or slices of this run ({_listed(foreign)}); "
            "a steering checkpoint never replaces base-model weights, so it is refused"
        )
    if missing:  # loading would silently keep their untrained starting values
        raise SteeringCheckpointError(f"{where} lacks trained tensors of this run ({_listed(missing)}): it is damaged or incomplete")
    for key, tensor in state.items():
        if tensor.shape != trained[key].shape:
            raise SteeringCheckpointError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, this model's has {tuple(trained[key].shape)}: "
                "the checkpoint was trained on another model, or was edited"
            )


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
