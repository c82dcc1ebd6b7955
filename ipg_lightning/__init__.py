"""ipg_lightning: find the components that drive an LLM's reasoning (Integrated Policy Gradient)
and turn them up or down with multiplicative gates, on PyTorch Lightning."""

from ipg_lightning._moved import install_moved_module_aliases
from ipg_lightning.answers import ExtractedAnswer, answers_match, extract_answer, normalize_answer
from ipg_lightning.attribution import AttributionReport, IPGAttribution, run_attribution
from ipg_lightning.data import ArithmeticChainTask, PromptTemplate, ReasoningBatch, ReasoningDataModule, ReasoningExample
from ipg_lightning.exported import load_steered
from ipg_lightning.folding import UnfoldableGateError, fold_gates_into_weights
from ipg_lightning.gates import ComponentGates
from ipg_lightning.metrics import AnswerRate, ReasoningAccuracy, ReasoningLength, ReflectionRate
from ipg_lightning.rewards import Completion, CompoundReward, accuracy, load_reward, reasoning_length
from ipg_lightning.sites import ARCHITECTURES, ArchitectureSpec, Site, UnsupportedArchitectureError, discover_sites
from ipg_lightning.steering import (
    ComponentSelection,
    GateSteering,
    LoraSettings,
    export_steered_model,
    gates_for_components,
    load_steering_checkpoint,
)
from ipg_lightning.trajectories import (
    SamplingConfig,
    Trajectories,
    backward_weighted_log_likelihood,
    completion_log_probs,
    sample_trajectories,
)

__version__ = "0.2.0.dev0"

install_moved_module_aliases()

__all__ = [
    "ARCHITECTURES",
    "AnswerRate",
    "ArchitectureSpec",
    "ArithmeticChainTask",
    "AttributionReport",
    "Completion",
    "ComponentGates",
    "ComponentSelection",
    "CompoundReward",
    "ExtractedAnswer",
    "GateSteering",
    "IPGAttribution",
    "LoraSettings",
    "PromptTemplate",
    "ReasoningAccuracy",
    "ReasoningBatch",
    "ReasoningDataModule",
    "ReasoningExample",
    "ReasoningLength",
    "ReflectionRate",
    "SamplingConfig",
    "Site",
    "Trajectories",
    "UnfoldableGateError",
    "UnsupportedArchitectureError",
    "accuracy",
    "answers_match",
    "backward_weighted_log_likelihood",
    "completion_log_probs",
    "discover_sites",
    "export_steered_model",
    "extract_answer",
    "fold_gates_into_weights",
    "gates_for_components",
    "load_reward",
    "load_steered",
    "load_steering_checkpoint",
    "normalize_answer",
    "reasoning_length",
    "run_attribution",
    "sample_trajectories",
]
