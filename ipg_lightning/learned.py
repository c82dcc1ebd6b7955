"""Learned steering: train the gates of selected components with the Lightning Trainer.

Only the selected gates move (every other gate is held at 1 by a gradient mask, the base weights
are frozen); a PEFT LoRA adapter can be trained jointly. Objectives (``ipg-method.md`` section 4):

- ``policy_gradient``: on-policy REINFORCE with the RLOO advantage on the reward, plus
  ``gate_penalty * sum (c_i - 1)^2`` and/or ``kl_coef * KL(pi_c || pi_base)`` (k3 estimator on the
  sampled tokens);
- ``supervised``: cross-entropy of reference reasoning traces (teacher forcing), plus the penalty.

Checkpoints hold only what was trained (gates, adapter, optimizer state) and the resolved component
names; :func:`load_steering_checkpoint` rebuilds a steered model from one.
"""

from __future__ import annotations

import inspect
import pickle
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from peft import LoraConfig, get_peft_model

from ipg_lightning.estimator import group_advantages
from ipg_lightning.evaluation import completions_of
from ipg_lightning.gates import ComponentGates
from ipg_lightning.identity import check_same_model, model_identity
from ipg_lightning.metrics import AnswerRate, ReasoningAccuracy, ReasoningLength, ReflectionRate
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.rewards import Reward, load_reward, reasoning_length, reward_import_paths, score_completions
from ipg_lightning.sites import ArchitectureSpec
from ipg_lightning.steering import ComponentSelection, component_mask, gates_for_components
from ipg_lightning.trajectories import (
    SamplingConfig,
    Trajectories,
    completion_log_probs,
    sample_trajectories,
    teacher_forced_trajectories,
)
from ipg_lightning.validation import check_at_least, check_gamma, check_sampling_has_signal

STEERING_KEY = "ipg_steering"


@dataclass(frozen=True)
class LoraSettings:
    """A PEFT LoRA adapter trained together with the gates.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names or suffixes to adapt (e.g. ``[q_proj, v_proj]``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def _plain(settings: Any) -> dict[str, Any] | None:
    """A dataclass (or dict, or None) as a plain dict (or None)."""
    return asdict(settings) if is_dataclass(settings) else (dict(settings) if settings is not None else None)


class GateSteering(L.LightningModule):
    """Train the gates of selected components (optionally with a LoRA adapter) by ``Trainer.fit``.

    Args:
        selection: which components to steer (top-k of a report, or names).
        model: local Hugging Face model directory, or ``tiny:<family>``.
        dtype: weights dtype.
        init_gate: starting value of the selected gates (1 = start from the unsteered model).
        objective: ``policy_gradient`` (reward-driven) or ``supervised`` (reference traces).
        reward: reward for ``policy_gradient`` (name, import path or weights).
        gate_penalty: coefficient of ``sum (c_i - 1)^2`` over the selected gates.
        kl_coef: coefficient of the KL divergence to the unsteered base model.
        lora: train a LoRA adapter jointly (None: gates only).
        learning_rate: Adam learning rate (gates and adapter).
        num_samples: trajectories per prompt for the policy gradient.
        temperature: training sampling temperature.
        top_p: training nucleus mass.
        max_new_tokens: generation cap, in training and validation.
        generation_batch_size: completions generated together.
        seed: sampling seed; mixed with the global step so every step draws new samples.
        architecture: module paths for an architecture that is not built in.
    """

    def __init__(
        self,
        selection: ComponentSelection,
        model: str = "tiny:llama",
        dtype: str = "float32",
        init_gate: float = 1.0,
        objective: Literal["policy_gradient", "supervised"] = "policy_gradient",
        reward: str | dict[str, float] = "accuracy",
        gate_penalty: float = 0.0,
        kl_coef: float = 0.0,
        lora: LoraSettings | None = None,
        learning_rate: float = 0.05,
        num_samples: int = 4,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        generation_batch_size: int = 16,
        seed: int = 0,
        architecture: ArchitectureSpec | None = None,
    ) -> None:
        super().__init__()
        if objective not in ("policy_gradient", "supervised"):
            raise ValueError(f"objective must be 'policy_gradient' or 'supervised', got {objective!r}")
        if not (gate_penalty >= 0 and kl_coef >= 0 and learning_rate > 0):
            raise ValueError(f"gate_penalty and kl_coef must be >= 0 and learning_rate > 0, got {gate_penalty}, {kl_coef}, {learning_rate}")
        check_gamma(init_gate, "init_gate")
        check_at_least(1, max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size, num_samples=num_samples)
        # Hyperparameters are stored as plain dicts: Lightning resumes with torch.load(weights_only=True),
        # which refuses pickled classes. save_hyperparameters reads these locals.
        selection, lora, architecture = _plain(selection), _plain(lora), _plain(architecture)
        self.save_hyperparameters(ignore=[] if isinstance(reward, (str, dict)) else ["reward"])
        self.selection = ComponentSelection(**selection)
        self.lora = LoraSettings(**lora) if lora is not None else None
        self.architecture = ArchitectureSpec(**architecture) if architecture is not None else None
        reward_import_paths(reward)  # names are checked now; an import path is imported only to train (setup("fit"))
        self._reward_spec = reward
        self._reward: Reward | None = None
        #: False for a module rebuilt from a checkpoint whose reward names code, unless the caller trusts it.
        self.reward_import_allowed = True
        self.model_name = model
        self.lm = None
        self.tokenizer = None
        self.gates: ComponentGates | None = None
        self.components: list[str] = []
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.val_accuracy, self.val_answer_rate = ReasoningAccuracy(), AnswerRate()
        self.val_reflection, self.val_length = ReflectionRate(), ReasoningLength()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer: Any, selection: ComponentSelection, **kwargs: Any) -> GateSteering:
        """Steer an already loaded model (Python API)."""
        module = cls(selection=selection, **kwargs)
        module.build(model, tokenizer)
        return module

    def build(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        components: list[str] | None = None,
        recorded_identity: dict[str, Any] | None = None,
        allow_other_model: bool = False,
    ) -> None:
        """Load the model (unless given), wrap it with LoRA if configured, and create the gates.

        ``components`` (with the ``recorded_identity`` of the model they were trained on) replace the
        selection, as when a checkpoint is reloaded; a model of another architecture is refused
        unless ``allow_other_model``.
        """
        if self.lm is not None:
            return
        if model is None:
            model, tokenizer = load_model_and_tokenizer(self.model_name, self.hparams.dtype)
        check_same_model(recorded_identity, model, self.model_name, "The steering checkpoint", allow_other_model)
        components = components or self.selection.resolve(model, self.model_name, self.architecture)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        lora = self.lora
        if lora is not None:
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                fan_in_fan_out=model.config.model_type == "gpt2",
            )
            with torch.random.fork_rng(devices=[]):  # the adapter's init depends on `seed` only
                torch.manual_seed(self.hparams.seed)
                model = get_peft_model(model, config)
        self.lm, self.tokenizer = model.eval(), tokenizer
        self.components = components
        self.gates = gates_for_components(self.lm, self.components, self.hparams.init_gate, self.architecture)
        for name, mask in component_mask(self.gates, self.components).items():
            self.gates.gate(name).register_hook(lambda gradient, mask=mask: gradient * mask.to(gradient.device))

    @property
    def reward_fn(self) -> Reward:
        """The reward, imported on first use (an import path runs that module's code)."""
        if self._reward is None:
            paths = reward_import_paths(self._reward_spec)
            if paths and not self.reward_import_allowed:
                raise PermissionError(
                    f"This module was rebuilt from a checkpoint whose reward imports {paths}, which runs that code; "
                    "pass trust_reward=True to load_steering_checkpoint if you trust the checkpoint"
                )
            self._reward = load_reward(self._reward_spec)
        return self._reward

    def setup(self, stage: str) -> None:
        """Import the reward (training only, before the model loads), build the model once, connect the data."""
        if stage == "fit":  # training-only settings fail here, before any work (a checkpoint rebuilt to evaluate skips them)
            if self.hparams.objective == "policy_gradient":
                check_sampling_has_signal(self.hparams.num_samples, self.hparams.temperature, "the policy_gradient objective")
            self.reward_fn  # noqa: B018
        self.build()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.tokenizer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the gates and, if present, the LoRA adapter."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.learning_rate)

    def on_fit_start(self) -> None:
        """Gates stay float32 whatever the Trainer's precision."""
        self.gates.float()

    # ----------------------------------------------------------------------------- training
    def _sampling(self, greedy: bool) -> SamplingConfig:
        hp = self.hparams
        if greedy:
            return SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=hp.max_new_tokens, batch_size=hp.generation_batch_size)
        return SamplingConfig(
            num_samples=hp.num_samples,
            temperature=hp.temperature,
            top_p=hp.top_p,
            max_new_tokens=hp.max_new_tokens,
            batch_size=hp.generation_batch_size,
            seed=hp.seed * 1_000_003 + self.global_step,
        )

    def gate_deviation(self) -> torch.Tensor:
        """``sum (c_i - 1)^2`` over the selected gates (the others are 1 by construction)."""
        return sum(((self.gates.gate(name) - 1) ** 2).sum() for name in self.gates.sites)

    def _log_probs(self, trajectories: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
        with self.gates.attach(self.lm):
            log_probs = completion_log_probs(self.lm, trajectories)
        mask = trajectories.padded()["completion_mask"][:, -log_probs.shape[1] :].to(log_probs.device)
        return log_probs, mask

    def _kl_to_base(self, trajectories: Trajectories, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            disable = getattr(self.lm, "disable_adapter", None)
            if disable is not None:
                with disable():
                    base = completion_log_probs(self.lm, trajectories)
            else:
                base = completion_log_probs(self.lm, trajectories)
        log_ratio = base - log_probs
        k3 = torch.exp(log_ratio) - 1 - log_ratio  # >= 0, unbiased for KL(pi_c || pi_base)
        return (k3 * mask).sum() / mask.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step of the chosen objective."""
        prompts = len(batch["prompt"])
        if self.hparams.objective == "supervised":
            missing = [i for i, solution in zip(batch["id"], batch["solution"]) if not solution]
            if missing:
                raise ValueError(f"The supervised objective needs reference solutions; examples {missing[:5]} have none")
            trajectories = teacher_forced_trajectories(self.tokenizer, batch["prompt"], batch["solution"])
            log_probs, mask = self._log_probs(trajectories)
            objective = -(log_probs * mask).sum() / mask.sum()
            self.log("train/nll", objective.detach(), prog_bar=True, batch_size=prompts)
        else:
            with torch.no_grad(), self.gates.attach(self.lm):
                trajectories = sample_trajectories(self.lm, self.tokenizer, batch["prompt"], self._sampling(False), batch["seed"].tolist())
            completions = completions_of(trajectories, batch["prompt"], batch["answer"], self.tokenizer)
            rewards = torch.tensor(score_completions(self.reward_fn, completions)).view(prompts, self.hparams.num_samples)
            advantages, _ = group_advantages(rewards, "rloo")
            log_probs, mask = self._log_probs(trajectories)
            weights = (advantages.flatten() / self.hparams.num_samples).to(log_probs)
            objective = -(weights * log_probs.sum(-1)).sum() / prompts
            if self.hparams.kl_coef > 0:
                kl = self._kl_to_base(trajectories, log_probs, mask)
                objective = objective + self.hparams.kl_coef * kl
                self.log("train/kl", kl.detach(), batch_size=prompts)
            self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=prompts)
        penalty = self.gate_deviation()
        self.log("train/gate_deviation", penalty.detach(), batch_size=prompts)
        return objective + self.hparams.gate_penalty * penalty

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Stop before sampling with gates that became NaN or infinite (the run diverged)."""
        self.check_gates_finite()

    def on_train_end(self) -> None:
        """Refuse to end a run (and hand out its gates) whose last step made a gate non-finite."""
        self.check_gates_finite()

    def check_gates_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the site if any gate is NaN or infinite."""
        for name in self.gates.sites:
            if not torch.isfinite(self.gates.gate(name)).all():
                raise FloatingPointError(
                    f"The gates of {name} became non-finite at step {self.global_step}: the training "
                    "diverged; lower learning_rate (or raise gate_penalty) and start again"
                )

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy generations with the current gates, into the reasoning metrics."""
        with self.gates.attach(self.lm):
            trajectories = sample_trajectories(self.lm, self.tokenizer, batch["prompt"], self._sampling(True), batch["seed"].tolist())
        completions = completions_of(trajectories, batch["prompt"], batch["answer"], self.tokenizer)
        texts = [c.text for c in completions]
        self.val_accuracy.update(texts, batch["answer"])
        self.val_answer_rate.update(texts)
        self.val_reflection.update(texts)
        self.val_length.update([reasoning_length(c) for c in completions])
        size = len(texts)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=size)
        self.log("val/answer_rate", self.val_answer_rate, batch_size=size)
        self.log("val/reflection_rate", self.val_reflection, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        """Log the reasoning-length distribution (a dict-valued metric)."""
        if self.val_length.update_count:
            self.log_dict({f"val/reasoning_length_{k}": v for k, v in self.val_length.compute().items()})
        self.val_length.reset()

    # ----------------------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (gates and adapter), by state-dict key."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {key: value for key, value in self.state_dict().items() if key in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base model from the checkpoint; record the steered components; never save NaN gates."""
        self.check_gates_finite()
        checkpoint["state_dict"] = self.trainable_state()
        checkpoint[STEERING_KEY] = {
            "components": self.components,
            "model": self.model_name,
            "model_identity": model_identity(self.lm, self.model_name),
            "lora": asdict(self.lora) if self.lora else None,
        }

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, trust_reward: bool = False, **kwargs: Any) -> GateSteering:
        """Lightning's loader, except that the reward the checkpoint names is imported only with ``trust_reward``.

        Prefer :func:`load_steering_checkpoint`, which also rebuilds the model, gates and adapter.
        """
        module = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        module.reward_import_allowed = trust_reward
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint steers the same components of the same model as this module."""
        steering = checkpoint.get(STEERING_KEY, {})
        saved = steering.get("components")
        if saved is not None and self.components and saved != self.components:
            raise ValueError(f"Checkpoint steers {saved[:5]}..., but this run selected {self.components[:5]}...")
        if self.lm is not None:
            check_same_model(steering.get("model_identity"), self.lm, self.model_name, "The checkpoint to resume from")


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
    if not (isinstance(components, list) and components and all(isinstance(c, str) for c in components)):
        raise SteeringCheckpointError(f"{path}: {STEERING_KEY}.components must be a non-empty list of component names")
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise SteeringCheckpointError(f"{path}: state_dict must map names to tensors")
    if not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise SteeringCheckpointError(f"{path}: hyper_parameters are missing")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SteeringCheckpointError(f"{path}: {key} holds non-finite values (NaN or inf): the run diverged; use an earlier checkpoint")
    return checkpoint


def load_steering_checkpoint(path: str | Path, model: str | None = None, trust_reward: bool = False, allow_other_model: bool = False) -> GateSteering:
    """Rebuild a trained :class:`GateSteering` from a Lightning checkpoint (gates and adapter loaded).

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
        hparams["model"] = model
    module = GateSteering(**hparams)
    module.reward_import_allowed = trust_reward
    steering = checkpoint[STEERING_KEY]
    module.build(components=steering["components"], recorded_identity=steering.get("model_identity"), allow_other_model=allow_other_model)
    own = module.state_dict()
    missing = set(checkpoint["state_dict"]) - set(own)
    if missing:
        raise SteeringCheckpointError(f"{path} holds tensors this model does not have: {sorted(missing)[:5]}")
    for key, tensor in checkpoint["state_dict"].items():
        if tensor.shape != own[key].shape:
            raise SteeringCheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, this model's has {tuple(own[key].shape)}: "
                "the checkpoint was trained on another model"
            )
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval()
