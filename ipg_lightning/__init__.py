"""ipg_lightning: find the components that drive an LLM's reasoning (Integrated Policy Gradient)
and turn them up or down with multiplicative gates, on PyTorch Lightning.

``import ipg_lightning`` imports nothing heavy: each name below is imported from its module the
first time it is used (PEP 562), so ``ipg --help`` and a script's first line stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

#: Every public name, and the module it comes from.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["ExtractedAnswer", "answers_match", "extract_answer", "is_correct", "normalize_answer"], "ipg_lightning.rewards.answers"),
    **dict.fromkeys(["Completion", "CompoundReward", "accuracy", "load_reward", "reasoning_length"], "ipg_lightning.rewards.functions"),
    **dict.fromkeys(["AttributionReport", "IPGAttribution", "run_attribution"], "ipg_lightning.attribution"),
    **dict.fromkeys(["ArithmeticChainTask", "PromptTemplate", "ReasoningBatch", "ReasoningDataModule", "ReasoningExample"], "ipg_lightning.data"),
    **dict.fromkeys(["AnswerRate", "PassAtK", "ReasoningAccuracy", "ReasoningLength", "ReflectionRate"], "ipg_lightning.metrics"),
    **dict.fromkeys(["ARCHITECTURES", "ArchitectureSpec", "UnsupportedArchitectureError"], "ipg_lightning.model.families"),
    **dict.fromkeys(["Site", "discover_sites"], "ipg_lightning.model.sites"),
    "ComponentGates": "ipg_lightning.gates.component_gates",
    **dict.fromkeys(["UnfoldableGateError", "fold_gates_into_weights"], "ipg_lightning.gates.folding"),
    "load_steered": "ipg_lightning.gates.exported",
    **dict.fromkeys(
        ["ComponentSelection", "GateSteering", "LoraSettings", "export_steered_model", "gates_for_components", "load_steering_checkpoint"],
        "ipg_lightning.steering",
    ),
    **dict.fromkeys(["SteeringVectors", "load_vectors", "save_vectors"], "ipg_lightning.vectors"),
    **dict.fromkeys(["contrast_vectors", "sae_direction_vectors"], "ipg_lightning.steering.vector_sources"),
    **dict.fromkeys(["SamplingConfig", "Trajectories"], "ipg_lightning.rollout.trajectories"),
    "sample_trajectories": "ipg_lightning.rollout.sampling",
    **dict.fromkeys(["backward_weighted_log_likelihood", "completion_log_probs"], "ipg_lightning.rollout.scoring"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ipg_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
