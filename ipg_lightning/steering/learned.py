"""Learned steering: train the gates of selected components, or steering vectors, with the Lightning Trainer.

Only the selected gates move (every other gate is held at 1 by a gradient mask, the base weights
are frozen). Jointly, or instead of the gates (``train_gates=False``), one of two fine-tunes can be
trained: a PEFT LoRA adapter, placed by name or where the selection lives
(:mod:`~ipg_lightning.steering.finetune.placement`), or the weight slices that belong to the selected
components (:mod:`~ipg_lightning.steering.finetune.slices`). The objectives are in
:mod:`~ipg_lightning.steering.objectives` (``docs/method.md`` section 7); every one of them gets the
penalty ``gate_penalty * sum (c_i - 1)^2``. Additive steering vectors
(:mod:`~ipg_lightning.steering.vector_training`) can train beside the gates, or alone (no selection).

Checkpoints hold only what was trained (gates, vectors, adapter or slices, optimizer state), the resolved
component names and where the fine-tune sits; :func:`load_steering_checkpoint` rebuilds a steered model from one.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.checks import check_at_least, check_gamma, check_sampling_has_signal
from ipg_lightning.data import ReasoningBatch
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.metrics import ReasoningMetrics
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import IN_MEMORY_MODEL, check_same_model, model_identity
from ipg_lightning.model.interventions import attached
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rewards.completions import completions_of
from ipg_lightning.rewards.functions import DeferredReward, Reward, reasoning_length
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering.checkpoint import (
    STEERING_KEY,
    SteeringCheckpointError,
    check_checkpoint_tensors,
    check_resume_settings,
    read_steering_checkpoint,
)
from ipg_lightning.steering.finetune.fine_tune import FineTune, keep_deltas_float32
from ipg_lightning.steering.finetune.lora import LoraSettings
from ipg_lightning.steering.objectives import OBJECTIVES
from ipg_lightning.steering.selection import ComponentSelection, component_mask, gates_for_components
from ipg_lightning.steering.vector_training import VectorTraining
from ipg_lightning.task import ReasoningTask, plain
from ipg_lightning.vectors.additive import SteeringVectors

#: How ``GateSteering`` samples unless told otherwise: full temperature, no nucleus cut, N = 4, 512 new
#: tokens. Change single settings with ``dataclasses.replace(STEERING_SAMPLING, max_new_tokens=64)``.
STEERING_SAMPLING = SamplingConfig(temperature=1.0, top_p=1.0)


def check_training_settings(
    objective: str,
    init_gate: float,
    gate_penalty: float,
    kl_coef: float,
    learning_rate: float,
    lora: bool,
    weight_slices: bool,
    train_gates: bool,
    gated: bool = True,
    vectors: bool = False,
) -> None:
    """Refuse, in one line, learned-steering settings that cannot train what the user meant."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if not (gate_penalty >= 0 and kl_coef >= 0 and learning_rate > 0):
        raise ValueError(f"gate_penalty and kl_coef must be >= 0 and learning_rate > 0, got {gate_penalty}, {kl_coef}, {learning_rate}")
    check_gamma(init_gate, "init_gate")
    if lora and weight_slices:
        raise ValueError("Train either a LoRA adapter (lora) or the components' weight slices (weight_slices), not both")
    if not (gated or vectors):
        raise ValueError("Nothing to steer: give components to gate (selection) or steering vectors to learn (vectors), or both")
    if weight_slices and not gated:
        raise ValueError("weight_slices trains the weights of selected components: give a selection too")
    if not ((train_gates and gated) or lora or weight_slices or vectors):
        raise ValueError("Nothing to train: train_gates is false and neither lora, weight_slices nor vectors is set")


class GateSteering(ReasoningTask):
    """Train the gates of selected components (optionally with a LoRA adapter, and steering vectors) by ``Trainer.fit``.

    Args:
        selection: which components to gate (top-k of a report, or names); None: no gates (learn ``vectors`` only).
        model_path: local Hugging Face model directory, or an alias (``tiny:<family>``, ``smollm2``).
        dtype: weights dtype.
        init_gate: starting value of the selected gates (1 = start from the unsteered model).
        objective: ``policy_gradient`` (reward-driven) or ``supervised`` (reference traces).
        reward: reward for ``policy_gradient`` (name, import path or weights).
        gate_penalty: coefficient of ``sum (c_i - 1)^2`` over the selected gates.
        kl_coef: coefficient of the KL divergence to the unsteered base model.
        lora: train a LoRA adapter jointly (None: none); ``lora.placement`` says where it goes.
        weight_slices: also train the weight slices that belong to the selected components (their
            rows and columns of the projections; every other weight stays bit-identical). Not with ``lora``.
        train_gates: train the selected gates (False: they stay at ``init_gate``, and only the adapter,
            the slices or the vectors train).
        vectors: also learn additive steering vectors at these sites, from zero, with an optional norm bound
            (:class:`~ipg_lightning.steering.vector_training.VectorTraining`); they are added after the gates.
        learning_rate: Adam learning rate (gates, vectors, adapter or slices).
        sampling: how training trajectories are sampled (N per prompt, temperature, top-p, max new
            tokens, generation batch size, seed); the seed is mixed with the global step so every
            step draws new samples, and also seeds the adapter. Validation decodes greedily with the
            same ``max_new_tokens``.
        architecture: module paths for an architecture that is not built in.
        allow_other_model: steer components of a report computed on a model of another architecture
            (refused by default: its component indices would mean other units).
    """

    def __init__(
        self,
        selection: ComponentSelection | None = None,
        model_path: str = "tiny:llama",
        dtype: str = "float32",
        init_gate: float = 1.0,
        objective: Literal["policy_gradient", "supervised"] = "policy_gradient",
        reward: str | dict[str, float] = "accuracy",
        gate_penalty: float = 0.0,
        kl_coef: float = 0.0,
        lora: LoraSettings | None = None,
        weight_slices: bool = False,
        train_gates: bool = True,
        learning_rate: float = 0.05,
        sampling: SamplingConfig = STEERING_SAMPLING,
        architecture: ArchitectureSpec | None = None,
        allow_other_model: bool = False,
        vectors: VectorTraining | None = None,
    ) -> None:
        super().__init__(model_path, dtype, plain(architecture))
        settings = (objective, init_gate, gate_penalty, kl_coef, learning_rate, lora is not None, weight_slices, train_gates)
        check_training_settings(*settings, gated=selection is not None, vectors=vectors is not None)
        self.save_plain_hyperparameters()
        self.selection = ComponentSelection(**self.hparams.selection) if selection is not None else None
        if self.selection is not None:
            self.selection.check_count()
        self.vector_training = VectorTraining(**self.hparams.vectors) if vectors is not None else None
        self.lora = LoraSettings(**self.hparams.lora) if lora is not None else None
        self.sampling = SamplingConfig(**self.hparams.sampling)
        check_at_least(1, max_new_tokens=self.sampling.max_new_tokens)
        #: Names are checked now; an import path is imported only to train (setup("fit")), and for a module
        #: rebuilt from a checkpoint only if the caller trusts it (``reward.import_allowed``).
        self.reward = DeferredReward(reward)
        self.gates: ComponentGates | None = None
        self.vectors: SteeringVectors | None = None
        self.components: list[str] = []
        #: Where the fine-tune sits, once the model is configured: the adapter's weights, or the trained slices.
        self.fine_tune = FineTune()
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.val_metrics = ReasoningMetrics()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, selection: ComponentSelection | None, **kwargs: Any) -> GateSteering:
        """Steer an already loaded model (Python API) instead of one loaded by path."""
        return super().for_model(model, tokenizer, selection=selection, **kwargs)

    def build(
        self,
        model: nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        components: list[str] | None = None,
        recorded_identity: dict[str, Any] | None = None,
        allow_other_model: bool = False,
    ) -> None:
        """Load the model (unless given), add the adapter or the weight slices if configured, and create the gates.

        ``components`` (with the ``recorded_identity`` of the model they were trained on) replace the
        selection, as when a checkpoint is reloaded; a model of another architecture is refused
        unless ``allow_other_model``.
        """
        if self.lm is not None:
            return
        if model is None:
            model, tokenizer = load_model_and_tokenizer(self.model_path, self.weights_dtype)
        if components is not None:  # rebuilt from a checkpoint: its gates must fit this model
            check_same_model(recorded_identity, model, self.model_path, "The steering checkpoint", allow_other_model)
        self.components = list(components or [])
        self.attach_model(model, tokenizer)

    def load_model(self) -> None:
        """Build the steered model once (see :meth:`build`)."""
        self.build()

    def configure_components(self) -> None:
        """Splice in the SAEs the selection needs, resolve it on this model, add the adapter or the weight
        slices, create the gates with their gradient mask (frozen unless ``train_gates``) and the vectors to learn."""
        if self.selection is not None:
            self.selection.attach_saes(self.lm, self.architecture)
            if not self.components:
                self.components = self.selection.resolve(self.lm, self.model_path, self.architecture, self.hparams.allow_other_model)
            gates_for_components(self.lm, self.components, 1.0, self.architecture)  # names every component this model lacks, before the fine-tune
        self.lm, self.fine_tune = FineTune.attach(
            self.lm, self.components, self.lora, self.hparams.weight_slices, self.sampling.seed, self.architecture
        )
        if self.vector_training is not None:
            self.vectors = self.vector_training.build(self.lm, self.architecture)
        if self.selection is None:
            return
        self.gates = gates_for_components(self.lm, self.components, self.hparams.init_gate, self.architecture)
        if not self.hparams.train_gates:
            self.gates.requires_grad_(False)
            return
        for name, mask in component_mask(self.gates, self.components).items():
            self.gates.gate(name).register_hook(lambda gradient, mask=mask: gradient * mask.to(gradient.device))

    @property
    def reward_fn(self) -> Reward:
        """The reward, imported on first use (an import path runs that module's code)."""
        return self.reward.get()

    def setup(self, stage: str) -> None:
        """Import the reward (training only, before the model loads), build the model once, connect the data."""
        if stage == "fit":  # training-only settings fail here, before any work (a checkpoint rebuilt to evaluate skips them)
            if OBJECTIVES[self.hparams.objective].samples:
                check_sampling_has_signal(self.sampling.num_samples, self.sampling.temperature, f"the {self.hparams.objective} objective")
            self.reward_fn  # noqa: B018
        super().setup(stage)

    def steering(self) -> AbstractContextManager:
        """Attach the gates and the vectors (those that exist) to the model for the duration of a block."""
        return attached(self.lm, self.gates, self.vectors)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over what trains: the gates, the LoRA adapter or the weight slices, the vectors."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.learning_rate)

    def on_fit_start(self) -> None:
        """Gates, vectors and weight-slice deltas stay float32 whatever the Trainer's precision."""
        for steering in (self.gates, self.vectors):
            if steering is not None:
                steering.float()
        keep_deltas_float32(self.lm)

    # ----------------------------------------------------------------------------- training
    def training_sampling(self) -> SamplingConfig:
        """This step's sampling: the configured one, its seed mixed with the global step."""
        return replace(self.sampling, seed=self.sampling.seed * 1_000_003 + self.global_step)

    def training_step(self, batch: ReasoningBatch, batch_idx: int) -> torch.Tensor:
        """One optimisation step of the chosen objective, plus the gate penalty."""
        loss = OBJECTIVES[self.hparams.objective].loss(self, batch)
        size = len(batch["prompt"])
        if self.vectors is not None:
            self.log("train/vector_norm", max(self.vectors.norms().values()), batch_size=size)
        if self.gates is None:
            return loss
        penalty = self.gates.squared_deviation()  # the unselected gates are 1 by construction
        self.log("train/gate_deviation", penalty.detach(), batch_size=size)
        return loss + self.hparams.gate_penalty * penalty

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a gate or a vector became NaN or infinite (the run diverged)."""
        for steering in (self.gates, self.vectors):
            if steering is not None:
                steering.check_finite(f"at step {self.global_step}")

    def on_train_batch_start(self, batch: ReasoningBatch, batch_idx: int) -> None:
        """Stop before sampling with gates or vectors that became NaN or infinite (the run diverged)."""
        self.check_finite()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then scale back every vector longer than ``vectors.max_norm`` (the projection of norm-bounded
        training: once per real step, before any callback or checkpoint sees the vectors)."""
        super().optimizer_step(*args, **kwargs)
        if self.vectors is not None and self.vector_training.max_norm is not None:
            self.vectors.clamp_norms(self.vector_training.max_norm)

    def on_train_end(self) -> None:
        """Refuse to end a run (and hand out its steering) whose last step made a gate or a vector non-finite."""
        self.check_finite()

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: ReasoningBatch, batch_idx: int) -> None:
        """Greedy generations with the current gates, into the reasoning metrics."""
        greedy = self.sampling.as_greedy()
        with self.steering():
            trajectories = sample_trajectories(self.lm, self.tokenizer, batch["prompt"], greedy, batch["seed"].tolist())
        completions = completions_of(trajectories, batch["prompt"], batch["answer"], self.tokenizer)
        metrics = self.val_metrics
        metrics.update([c.text for c in completions], [c.gold for c in completions], [reasoning_length(c) for c in completions])
        size = len(completions)
        self.log("val/accuracy", metrics.accuracy, prog_bar=True, batch_size=size)
        self.log("val/answer_rate", metrics.answer_rate, batch_size=size)
        self.log("val/reflection_rate", metrics.reflection_rate, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        """Log the reasoning-length distribution (a dict-valued metric)."""
        length = self.val_metrics.reasoning_length
        if length.update_count:
            self.log_dict({f"val/reasoning_length_{k}": v for k, v in length.compute().items()})
        length.reset()

    # ----------------------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (gates, adapter or slice deltas), by state-dict key."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {key: value for key, value in self.state_dict().items() if key in trainable}

    def gate_values(self) -> dict[str, float]:
        """The current gate value of each gated component, by name (none without a selection)."""
        return {name: float(self.gates.component_value(name)) for name in self.components}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base model from the checkpoint; record the steered components; never save NaN gates or vectors."""
        self.check_finite()
        checkpoint["state_dict"] = self.trainable_state()
        checkpoint[STEERING_KEY] = steering_record(self)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, trust_reward: bool = False, **kwargs: Any) -> GateSteering:
        """Lightning's loader, except that the reward the checkpoint names is imported only with ``trust_reward``.

        Prefer :func:`load_steering_checkpoint`, which also rebuilds the model, gates and adapter.
        """
        module = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        module.reward.import_allowed = trust_reward
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint steers the same components of the same model as this module, holds only what
        trains, and (when resuming) was trained with the same optimizer settings, which its optimizer state carries."""
        check_resumable(checkpoint, self, getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None)


def steering_record(module: GateSteering) -> dict[str, Any]:
    """What a checkpoint records under :data:`STEERING_KEY`: the steered components, the model's name and
    identity, and where the fine-tune sits (the adapter's settings, or the trained weight slices)."""
    return {
        "components": module.components,
        "model": module.model_path,
        "model_identity": model_identity(module.lm, module.model_path),
        "lora": plain(module.lora) if module.lora else None,
        "vectors": list(module.vectors.sites) if module.vectors is not None else [],
        **module.fine_tune.record(),
    }


def check_resumable(checkpoint: dict[str, Any], module: GateSteering, resumed: str | None = None) -> None:
    """Refuse a checkpoint that steers other components or another model than ``module``, holds tensors it does not
    train, or (when resuming from ``resumed``) was trained with other optimizer settings, which its optimizer state carries."""
    steering = checkpoint.get(STEERING_KEY, {})
    what = f"The checkpoint to resume from ({resumed})" if resumed else "The checkpoint to resume from"
    saved = steering.get("components")
    if saved is not None and module.components and saved != module.components:
        raise ValueError(f"{what} steers {saved[:5]}..., but this run selected {module.components[:5]}...")
    if module.lm is not None:
        check_same_model(steering.get("model_identity"), module.lm, module.model_path, what)
        module.fine_tune.check_matches(steering, what)
        check_checkpoint_tensors(checkpoint.get("state_dict", {}), module.trainable_state(), what)
    if module._trainer is not None and "optimizer_states" in checkpoint:
        check_resume_settings(checkpoint.get("hyper_parameters", {}), dict(module.hparams))


def load_steering_checkpoint(path: str | Path, model: str | None = None, trust_reward: bool = False, allow_other_model: bool = False) -> GateSteering:
    """Rebuild a trained :class:`GateSteering` from a Lightning checkpoint (gates, and adapter or slices, loaded).

    Args:
        path: a checkpoint written by ``ipg steer`` (read without unpickling, see :func:`read_steering_checkpoint`).
        model: overrides the model path saved in the checkpoint (e.g. the same weights elsewhere).
        trust_reward: allow importing the reward the checkpoint names when it is an import path (only
            training uses the reward; evaluation and export never import it).
        allow_other_model: apply the gates to a model of another architecture than they were trained on.
    """
    checkpoint = read_steering_checkpoint(path)
    accepted = inspect.signature(GateSteering.__init__).parameters
    # LightningCLI adds private entries (e.g. "_instantiator") to the saved hyperparameters.
    hparams = {key: value for key, value in checkpoint["hyper_parameters"].items() if key in accepted}
    if model is not None:
        hparams["model_path"] = model
    elif hparams.get("model_path") == IN_MEMORY_MODEL:
        raise SteeringCheckpointError(f"{path} was trained on a model that was never saved under a path: pass the model to load it on")
    steering = checkpoint[STEERING_KEY]
    learned_sites = steering.get("vectors") or []
    if learned_sites and isinstance(hparams.get("vectors"), dict) and hparams["vectors"].get("layers") is None:
        # the blocks the vectors were learned at, not the default block of the model they are loaded on
        hparams["vectors"] = {**hparams["vectors"], "layers": sorted({int(name.split(".")[1]) for name in learned_sites})}
    try:  # what it records about its components and model is named with the file
        module = GateSteering(**hparams)
        module.build(components=steering["components"], recorded_identity=steering.get("model_identity"), allow_other_model=allow_other_model)
    except ValueError as error:
        raise type(error)(f"{path}: {error}") from None
    except TypeError as error:  # e.g. a learning rate that is text
        raise SteeringCheckpointError(f"{path}: its hyper_parameters are not valid settings ({error})") from None
    module.reward.import_allowed = trust_reward
    module.fine_tune.check_matches(steering, str(path))
    check_checkpoint_tensors(checkpoint["state_dict"], module.trainable_state(), str(path))
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval()
