"""IPG attribution as a Lightning validation loop, with baseline selection methods.

Each validation step is one attribution step over a batch of support prompts: sample N
trajectories per prompt (no gradients), score them, compute group advantages, then integrate the
policy-gradient surrogate along the gate path (``ipg-method.md`` section 3). Scores accumulate in
DDP-reducible state and become an :class:`~ipg_lightning.report.AttributionReport` at the end.

Run it with ``Trainer(inference_mode=False).validate(...)``: Lightning evaluates under
``torch.inference_mode`` by default, and tensors made there can never take part in autograd, so
the gate gradients IPG needs would be impossible. With ``inference_mode=False`` Lightning uses
``torch.no_grad`` instead, and each step turns gradients back on for its backward passes.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import Metric

from ipg_lightning.activations import mean_completion_activations
from ipg_lightning.estimator import AdvantageMethod, QuadratureRule, group_advantages, integrate_path, move_along_path
from ipg_lightning.evaluation import completions_of
from ipg_lightning.gates import ComponentGates
from ipg_lightning.identity import IN_MEMORY_MODEL, model_identity
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.outputs import check_output_dir
from ipg_lightning.report import AttributionReport, UninformativeReportError
from ipg_lightning.rewards import load_reward, score_completions
from ipg_lightning.sites import ArchitectureSpec, resolve_architecture, unwrap_model
from ipg_lightning.trajectories import (
    SamplingConfig,
    Trajectories,
    backward_weighted_log_likelihood,
    check_context_length,
    sample_trajectories,
    teacher_forced_trajectories,
    weighted_log_likelihood,
)
from ipg_lightning.validation import check_at_least, check_sampling_has_signal

AttributionMethod = Literal["ipg", "grad_x_act", "random", "activation", "mean_diff", "ig_reference"]
METHODS: tuple[str, ...] = ("ipg", "grad_x_act", "random", "activation", "mean_diff", "ig_reference")
_COUNTERS = ("prompts", "signal_prompts", "trajectories", "tokens", "reward_sum", "score_sum", "surrogate_delta", "correct_rows", "incorrect_rows")


class AttributionAccumulator(Metric):
    """Sums of per-prompt scores and counters; every state reduces by ``sum`` across processes."""

    full_state_update = False

    def __init__(self, site_sizes: dict[str, int]) -> None:
        super().__init__()
        self.keys = {name: name.replace(".", "__") for name in site_sizes}
        for name, size in site_sizes.items():
            for prefix in ("score", "contrast"):
                self.add_state(f"{prefix}__{self.keys[name]}", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        for counter in _COUNTERS:
            self.add_state(counter, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: dict[str, torch.Tensor] | None = None, contrast: dict[str, torch.Tensor] | None = None, **counts: float) -> None:
        """Add per-site score sums (and the second, ``contrast`` sums of difference-of-means) and counters."""
        for prefix, values in (("score", scores or {}), ("contrast", contrast or {})):
            for name, vector in values.items():
                state = getattr(self, f"{prefix}__{self.keys[name]}")
                state += vector.to(state.device, torch.float64)
        for counter, value in counts.items():
            state = getattr(self, counter)
            state += float(value)

    def compute(self) -> dict[str, Any]:
        """Score sums per site (and contrast sums) plus counters, as plain values."""
        return {
            "score": {name: getattr(self, f"score__{key}").clone() for name, key in self.keys.items()},
            "contrast": {name: getattr(self, f"contrast__{key}").clone() for name, key in self.keys.items()},
            **{counter: getattr(self, counter).item() for counter in _COUNTERS},
        }


class IPGAttribution(L.LightningModule):
    """Attribute a reward to model components with Integrated Policy Gradient (or a baseline).

    Args:
        model: local Hugging Face model directory, or ``tiny:<family>`` for the tests' tiny model.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        families: site families to attribute (``resid_post``, ``mlp_neuron``, ``attn_head``,
            ``attn_out``, ``mlp_out``).
        layers: blocks to attribute; default one mid-to-late block (at 3/4 depth), as in the paper.
        method: ``ipg``; or a baseline: ``grad_x_act`` (IPG without integration: one point at
            alpha = 1), ``random``, ``activation`` (mean activation magnitude), ``mean_diff``
            (mean activation of trajectories with reward > 0.5, i.e. correct ones under the accuracy
            reward, minus that of the others), ``ig_reference``
            (Integrated Gradients of the teacher-forced likelihood of reference solutions).
        reward: a built-in reward name, an import path ``pkg.module:function``, or a mapping of weights.
        advantage: ``rloo`` (default, unbiased), ``grpo`` (the paper's), or ``none``.
        steps: number of quadrature points q (paper: 10).
        rule: quadrature rule: ``right`` (paper: alpha_k = k/q), ``left``, ``midpoint``,
            ``trapezoid``, ``gauss_legendre``.
        baseline: the baseline gate value c' (paper: 0).
        estimation: ``fixed`` (sample once at c = 1, teacher-force at every point) or ``resample``
            (fresh on-policy samples at every point; N x q generations per prompt).
        path: ``layer`` (each site's gates move alone) or ``family`` (all sites of a family together).
        num_samples: trajectories per prompt N (paper: 3-5).
        temperature: sampling temperature (paper: 0.6).
        top_p: nucleus mass (paper: 0.8).
        max_new_tokens: generation cap (paper: 512).
        stop_strings: extra strings that end a completion.
        generation_batch_size: completions generated together.
        chunk_size: trajectories per teacher-forced forward/backward (bounds memory).
        seed: sampling seed (mixed with each prompt's seed) and the random baseline's seed.
        architecture: module paths for an architecture that is not built in.
        output_dir: where the report is written at the end of validation (None: keep it in memory).
        overwrite: replace an existing report directory.
    """

    def __init__(
        self,
        model: str = "tiny:llama",
        dtype: str = "float32",
        families: list[str] = ["resid_post"],  # noqa: B006 (jsonargparse needs a literal default)
        layers: list[int] | None = None,
        method: AttributionMethod = "ipg",
        reward: str | dict[str, float] = "accuracy",
        advantage: AdvantageMethod = "rloo",
        steps: int = 10,
        rule: QuadratureRule = "right",
        baseline: float = 0.0,
        estimation: Literal["fixed", "resample"] = "fixed",
        path: Literal["layer", "family"] = "layer",
        num_samples: int = 4,
        temperature: float = 0.6,
        top_p: float = 0.8,
        max_new_tokens: int = 512,
        stop_strings: list[str] | None = None,
        generation_batch_size: int = 16,
        chunk_size: int = 8,
        seed: int = 0,
        architecture: ArchitectureSpec | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)}")
        if estimation not in ("fixed", "resample") or path not in ("layer", "family"):
            raise ValueError(f"estimation must be fixed|resample and path layer|family, got {estimation!r}, {path!r}")
        if not baseline < 1:
            raise ValueError(f"baseline must be < 1 (the path runs from it to 1), got {baseline}")
        if not families:
            raise ValueError("families is empty: name at least one site family to attribute, e.g. [mlp_neuron]")
        if layers is not None and not layers:
            raise ValueError("layers is empty: name at least one block, or leave it unset for the default (3/4 depth)")
        check_at_least(
            1, steps=steps, chunk_size=chunk_size, generation_batch_size=generation_batch_size, max_new_tokens=max_new_tokens, num_samples=num_samples
        )
        if method in ("ipg", "grad_x_act"):
            check_sampling_has_signal(num_samples, temperature, f"method {method!r}")
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)  # refuse now rather than after the run
        self.save_hyperparameters(ignore=[] if isinstance(reward, (str, dict)) else ["reward"])
        self.reward_fn = load_reward(reward)
        self.reward_name = reward if isinstance(reward, (str, dict)) else f"{reward.__module__}:{reward.__qualname__}"
        self.sampling = SamplingConfig(
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_strings=tuple(stop_strings or ()),
            batch_size=generation_batch_size,
            seed=seed,
        )
        if method == "grad_x_act":  # IPG without integration: one point at alpha = 1
            steps, rule = 1, "right"
        self.steps, self.rule = steps, rule
        self.architecture = ArchitectureSpec(**architecture) if isinstance(architecture, dict) else architecture
        self.model_name = model
        self.lm = None
        self.tokenizer = None
        self.gates: ComponentGates | None = None
        self.accumulator: AttributionAccumulator | None = None
        self.report: AttributionReport | None = None
        self._started = 0.0

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> IPGAttribution:
        """Attribute an already loaded model (Python API) instead of loading ``model`` by name."""
        module = cls(model=getattr(model.config, "_name_or_path", "") or IN_MEMORY_MODEL, **kwargs)
        module._attach_model(model, tokenizer)
        return module

    def _attach_model(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.lm = model.eval()
        for parameter in self.lm.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        num_layers = self._num_layers()
        layers = self.hparams.layers if self.hparams.layers is not None else [round(0.75 * (num_layers - 1))]
        self.gates = ComponentGates.for_model(self.lm, self.hparams.families, layers, self.architecture)
        self.accumulator = AttributionAccumulator({name: site.size for name, site in self.gates.sites.items()})

    def _num_layers(self) -> int:
        spec = resolve_architecture(self.lm, self.architecture)
        return len(unwrap_model(self.lm).get_submodule(spec.layers))

    def setup(self, stage: str) -> None:
        """Load the model (once), and hand its tokenizer to the data module."""
        if self.lm is None:
            self._attach_model(*load_model_and_tokenizer(self.model_name, self.hparams.dtype))
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.tokenizer)

    def on_validation_start(self) -> None:
        """Refuse to run under inference mode, where gate gradients cannot exist; keep gates in float32."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("IPG attribution needs gradients inside validation: create the Trainer with inference_mode=False")
        # A "bf16-true"/"16-true" Trainer converts every parameter; gates must keep full precision
        # (quadrature points like 0.1 and their gradients); each edit casts them to the activation dtype.
        self.gates.float()
        self.accumulator.reset()
        self._started = time.perf_counter()

    # ----------------------------------------------------------------------------- one step
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One attribution step over a batch of prompts; results go to the accumulator."""
        method = self.hparams.method
        with torch.enable_grad(), self.gates.attach(self.lm):
            if method == "random":
                self.accumulator.update(prompts=len(batch["prompt"]))
            elif method == "ig_reference":
                self._reference_step(batch)
            else:
                self._sampled_step(batch)

    def _groups(self) -> list[list[str]]:
        if self.hparams.path == "layer":
            return [[name] for name in self.gates.sites]
        groups: dict[str, list[str]] = {}
        for name, site in self.gates.sites.items():
            groups.setdefault(site.family, []).append(name)
        return list(groups.values())

    def _rewards(self, batch: dict[str, Any], trajectories: Trajectories) -> torch.Tensor:
        completions = completions_of(trajectories, batch["prompt"], batch["answer"], self.tokenizer)
        values = score_completions(self.reward_fn, completions)
        return torch.tensor(values, dtype=torch.float64).view(len(batch["prompt"]), self.sampling.num_samples)

    def _sample(self, batch: dict[str, Any]) -> Trajectories:
        return sample_trajectories(self.lm, self.tokenizer, batch["prompt"], self.sampling, batch["seed"].tolist())

    def _sampled_step(self, batch: dict[str, Any]) -> None:
        trajectories = self._sample(batch)
        rewards = self._rewards(batch, trajectories)
        counts = dict(
            prompts=len(batch["prompt"]), trajectories=len(trajectories), tokens=trajectories.num_completion_tokens, reward_sum=rewards.sum().item()
        )
        method = self.hparams.method
        if method in ("activation", "mean_diff"):
            self._activation_step(batch, trajectories, rewards, counts)
            return
        advantages, has_signal = group_advantages(rewards, self.hparams.advantage)
        counts["signal_prompts"] = int(has_signal.sum())
        self.log("zero_signal_prompts", float((~has_signal).sum()), prog_bar=True, reduce_fx="sum", batch_size=len(batch["prompt"]))
        if not has_signal.any():
            self.accumulator.update(**counts)
            return
        if self.hparams.estimation == "fixed":
            rows = [r for r in range(len(trajectories)) if has_signal[trajectories.prompt_index[r]]]
            kept = trajectories.select(rows)
            weights = (advantages.flatten()[rows] / self.sampling.num_samples).float()
            self._integrate_fixed(kept, weights, counts)
        else:
            self._integrate_resampled(batch, rewards, counts)

    def _integrate_fixed(self, trajectories: Trajectories, weights: torch.Tensor, counts: dict[str, float]) -> None:
        chunk = self.hparams.chunk_size
        scores, delta = {}, 0.0
        value_at_one = None
        for group in self._groups():
            result = integrate_path(
                self.gates,
                group,
                lambda alpha: backward_weighted_log_likelihood(self.lm, trajectories, weights, chunk),
                baseline=self.hparams.baseline,
                rule=self.rule,
                steps=self.steps,
            )
            scores.update(result.scores)
            values = dict(zip(result.alphas, result.surrogate_values))
            if value_at_one is None:
                value_at_one = values.get(1.0)
                if value_at_one is None:
                    value_at_one = weighted_log_likelihood(self.lm, trajectories, weights, chunk)
            value_at_baseline = values.get(0.0)
            if value_at_baseline is None:
                move_along_path(self.gates, group, self.hparams.baseline, 0.0)
                value_at_baseline = weighted_log_likelihood(self.lm, trajectories, weights, chunk)
                self.gates.reset(1.0)
            delta += value_at_one - value_at_baseline
        total = sum(float(s.double().sum()) for s in scores.values())
        self.accumulator.update(scores=scores, score_sum=total, surrogate_delta=delta, **counts)

    def _integrate_resampled(self, batch: dict[str, Any], rewards_at_one: torch.Tensor, counts: dict[str, float]) -> None:
        def on_policy_gradient(alpha: float) -> float:
            fresh = self._sample(batch)
            advantages, _ = group_advantages(self._rewards(batch, fresh), self.hparams.advantage)
            weights = (advantages.flatten() / self.sampling.num_samples).float()
            return backward_weighted_log_likelihood(self.lm, fresh, weights, self.hparams.chunk_size)

        scores, delta = {}, 0.0
        reward_at_one = rewards_at_one.mean(1).sum().item()
        for group in self._groups():
            result = integrate_path(self.gates, group, on_policy_gradient, self.hparams.baseline, self.rule, self.steps)
            scores.update(result.scores)
            move_along_path(self.gates, group, self.hparams.baseline, 0.0)
            reward_at_baseline = self._rewards(batch, self._sample(batch)).mean(1).sum().item()
            self.gates.reset(1.0)
            delta += reward_at_one - reward_at_baseline  # J(1) - J(c'), summed over prompts
        total = sum(float(s.double().sum()) for s in scores.values())
        self.accumulator.update(scores=scores, score_sum=total, surrogate_delta=delta, **counts)

    def _activation_step(self, batch: dict[str, Any], trajectories: Trajectories, rewards: torch.Tensor, counts: dict[str, float]) -> None:
        sites = list(self.gates.sites.values())
        per_row = mean_completion_activations(self.lm, sites, trajectories, self.hparams.chunk_size)
        prompts, samples = len(batch["prompt"]), self.sampling.num_samples
        if self.hparams.method == "activation":
            scores = {name: values.abs().view(prompts, samples, -1).mean(1).sum(0) for name, values in per_row.items()}
            self.accumulator.update(scores=scores, **counts)
            return
        correct = rewards.flatten() > 0.5  # with the accuracy reward: correct vs incorrect
        scores = {name: values[correct].sum(0) for name, values in per_row.items()}
        contrast = {name: values[~correct].sum(0) for name, values in per_row.items()}
        self.accumulator.update(scores=scores, contrast=contrast, correct_rows=int(correct.sum()), incorrect_rows=int((~correct).sum()), **counts)

    def _reference_step(self, batch: dict[str, Any]) -> None:
        missing = [i for i, solution in zip(batch["id"], batch["solution"]) if not solution]
        if missing:
            raise ValueError(f"ig_reference needs reference solutions; examples {missing[:5]} have none")
        trajectories = teacher_forced_trajectories(self.tokenizer, batch["prompt"], batch["solution"])
        lengths = [len(p) + len(c) for p, c in zip(trajectories.prompt_ids, trajectories.completion_ids)]
        check_context_length(
            self.lm, lengths, [f"{p} {s}" for p, s in zip(batch["prompt"], batch["solution"])], what="prompt with its reference solution"
        )
        weights = torch.ones(len(trajectories))
        counts = dict(
            prompts=len(batch["prompt"]),
            signal_prompts=len(batch["prompt"]),
            trajectories=len(trajectories),
            tokens=trajectories.num_completion_tokens,
        )
        self._integrate_fixed(trajectories, weights, counts)

    # ----------------------------------------------------------------------------- the report
    def on_validation_epoch_end(self) -> None:
        """Reduce the state across processes, build the report, and write it on rank 0."""
        state = self.accumulator.compute()
        self.accumulator.reset()
        self.report = self._build_report(state)
        self.log("mean_reward", float(self.report.metadata["mean_reward"] or 0.0), sync_dist=False)
        output_dir = self.hparams.output_dir
        reason = self._uninformative_reason(state) or self.report.uninformative_reason()
        if reason is not None:  # refuse to hand out scores that rank nothing; the report stays in memory
            self.report.metadata["degenerate"] = reason
            written = " No report was written." if output_dir else ""
            raise UninformativeReportError(f"The attribution carries no information: {reason}.{written}")
        if output_dir and self.trainer.is_global_zero:
            self.report.save(output_dir, overwrite=self.hparams.overwrite)

    def _uninformative_reason(self, state: dict[str, Any]) -> str | None:
        method, prompts = self.hparams.method, int(state["prompts"])
        if prompts == 0:
            return "no support prompt was attributed (the validation split is empty)"
        if method in ("ipg", "grad_x_act") and state["signal_prompts"] == 0:
            mean = state["reward_sum"] / max(state["trajectories"], 1.0)
            return (
                f"none of the {prompts} support prompts carried signal: the {self.sampling.num_samples} rewards of each "
                f"prompt were all equal (mean reward {mean:.3g}). Draw more samples (num_samples), sample at a higher "
                "temperature, or use problems the model solves sometimes but not always"
            )
        if method == "mean_diff" and 0 in (state["correct_rows"], state["incorrect_rows"]):
            side = "reward > 0.5" if state["incorrect_rows"] == 0 else "reward <= 0.5"
            return (
                f"mean_diff contrasts trajectories with reward > 0.5 against the others, but all {int(state['trajectories'])} "
                f"had {side}: use problems the model solves sometimes but not always"
            )
        return None

    def _final_scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        scores = self._dataset_scores(state)
        # torchmetrics squeezes one-element results to 0-dim; sub-layer sites keep their (1,) shape.
        return {name: scores[name].reshape(site.size) for name, site in self.gates.sites.items()}

    def _dataset_scores(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        prompts = max(state["prompts"], 1.0)
        method = self.hparams.method
        if method == "random":
            generator = torch.Generator().manual_seed(self.hparams.seed)
            return {name: torch.randn(site.size, generator=generator) for name, site in self.gates.sites.items()}
        if method == "mean_diff":
            correct, incorrect = max(state["correct_rows"], 1.0), max(state["incorrect_rows"], 1.0)
            return {name: (state["score"][name] / correct - state["contrast"][name] / incorrect).float() for name in self.gates.sites}
        return {name: (total / prompts).float() for name, total in state["score"].items()}

    def _build_report(self, state: dict[str, Any]) -> AttributionReport:
        prompts = max(state["prompts"], 1.0)
        datamodule = getattr(self.trainer, "datamodule", None)
        metadata = {
            "method": self.hparams.method,
            "config": {**{k: (asdict(v) if isinstance(v, ArchitectureSpec) else v) for k, v in self.hparams.items()}, "reward": self.reward_name},
            "effective": {"steps": self.steps, "rule": self.rule},
            "model": self.model_name,
            "model_identity": model_identity(self.lm, self.model_name),
            "data": {"source": getattr(datamodule, "source", None), "split": "val", "seed": getattr(datamodule, "seed", None)},
            "counts": {
                "prompts": int(state["prompts"]),
                "trajectories": int(state["trajectories"]),
                "zero_signal_prompts": int(state["prompts"] - state["signal_prompts"]) if self.hparams.method in ("ipg", "grad_x_act") else None,
                "completion_tokens": int(state["tokens"]),
                "correct_trajectories": int(state["correct_rows"]) if self.hparams.method == "mean_diff" else None,
            },
            "mean_reward": state["reward_sum"] / state["trajectories"] if state["trajectories"] else None,
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "world_size": self.trainer.world_size,
        }
        if self.hparams.method in ("ipg", "grad_x_act", "ig_reference"):
            total, delta = state["score_sum"] / prompts, state["surrogate_delta"] / prompts
            target = "J(1) - J(baseline)" if self.hparams.estimation == "resample" and self.hparams.method != "ig_reference" else "L(1) - L(baseline)"
            metadata["completeness"] = {
                "sum_of_scores": total,
                "target": target,
                "surrogate_delta": delta,
                "residual": total - delta,
                "relative_residual": abs(total - delta) / max(abs(delta), 1e-12),
                "note": "per-prompt means; sum over all paths",
            }
        sites = {name: {"family": s.family, "layer": s.layer, "size": s.size} for name, s in self.gates.sites.items()}
        return AttributionReport(scores=self._final_scores(state), sites=sites, metadata=metadata)


def run_attribution(module: IPGAttribution, datamodule: L.LightningDataModule, **trainer_kwargs: Any) -> AttributionReport:
    """One attribution pass (``Trainer(inference_mode=False).validate``) and its report.

    ``trainer_kwargs`` go to the ``Trainer`` (e.g. ``enable_progress_bar=False``, ``devices=2``);
    by default it runs on the CPU with no logger and no model summary.
    """
    settings = {"accelerator": "cpu", "logger": False, "enable_model_summary": False, **trainer_kwargs, "inference_mode": False}
    L.Trainer(**settings).validate(module, datamodule=datamodule, verbose=False)
    return module.report
