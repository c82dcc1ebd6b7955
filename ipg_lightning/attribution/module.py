"""IPG attribution as a Lightning validation loop; the method itself is a strategy object.

Each validation step is one attribution step over a batch of support prompts, delegated to the
chosen :mod:`method <ipg_lightning.attribution.methods>` (IPG: sample N trajectories per prompt,
score them, take group advantages, integrate the policy-gradient surrogate along the gate path;
``docs/method.md`` section 3). Sums accumulate in DDP-reducible state and become an
:class:`~ipg_lightning.attribution.report.AttributionReport` at the end.

Run it with ``Trainer(inference_mode=False).validate(...)``: Lightning evaluates under
``torch.inference_mode`` by default, and tensors made there can never take part in autograd, so
the gate gradients IPG needs would be impossible. With ``inference_mode=False`` Lightning uses
``torch.no_grad`` instead, and each step turns gradients back on for its backward passes.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ipg_lightning.attribution.accumulator import AttributionAccumulator
from ipg_lightning.attribution.estimator import AdvantageMethod, QuadratureRule, SurrogateChoice
from ipg_lightning.attribution.kept import KeptTrajectories, gathered
from ipg_lightning.attribution.metadata import Completeness, Quadrature, ReportCounts, ReportMetadata
from ipg_lightning.attribution.methods import (
    METHODS,
    AttributionMethodName,
    MethodSettings,
    check_method,
    resolve_surrogate,
    scarce_signal_advice,
)
from ipg_lightning.attribution.plots import plot_report
from ipg_lightning.attribution.report import AttributionReport, UninformativeReportError
from ipg_lightning.data import PromptTemplate, ReasoningBatch
from ipg_lightning.evaluation.protocols import protocol_record
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.families import ArchitectureSpec, SiteFamilyName
from ipg_lightning.model.identity import model_identity
from ipg_lightning.model.sites import default_layer
from ipg_lightning.outputs import check_output_dir
from ipg_lightning.rewards.completions import reward_matrix
from ipg_lightning.rewards.functions import load_reward, reward_record
from ipg_lightning.rollout.passes.frozen_prefix import first_live_block
from ipg_lightning.rollout.passes.memory import RunMemory, peak_is_resettable
from ipg_lightning.rollout.passes.teacher_forced import MemoryLimits, TeacherForcedPasses
from ipg_lightning.rollout.sampling import sample_trajectories, sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories
from ipg_lightning.sae import IN_MEMORY_SAE, attach_saes
from ipg_lightning.task import ReasoningTask


def check_sites_and_credit(families: list[str], layers: list[int] | None, saes: list[str], credit: str) -> None:
    """Refuse, in one line, an attribution whose sites or credit cannot be what the user meant."""
    if credit not in ("full", "local"):
        raise ValueError(f"credit must be full|local, got {credit!r}")
    if not families:
        raise ValueError("families is empty: name at least one site family to attribute, e.g. [mlp_neuron]")
    if layers is not None and not layers:
        raise ValueError("layers is empty: name at least one block, or leave it unset for the default (3/4 depth)")
    if saes and "sae_feature" not in families:
        raise ValueError(f"saes are given but families {list(families)} has no sae_feature: add it, or leave saes out")


class IPGAttribution(ReasoningTask):
    """Attribute a reward to model components with Integrated Policy Gradient (or a baseline).

    Args:
        model_path: local Hugging Face model directory, or an alias (``tiny:<family>``, ``smollm2``).
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        families: site families to attribute (``resid_post``, ``mlp_neuron``, ``attn_head``,
            ``attn_out``, ``mlp_out``; ``sae_feature`` with ``saes``; for mixture-of-experts models
            also ``expert_neuron``, ``expert``, ``shared_expert_neuron``, ``shared_expert``).
        layers: blocks to attribute; default one mid-to-late block (at 3/4 depth), as in the paper.
        method: ``ipg``; or a baseline: ``grad_x_act`` (IPG without integration: one point at
            alpha = 1), ``random``, ``activation`` (mean activation magnitude), ``mean_diff``
            (mean activation of trajectories above their prompt's mean reward minus that of those
            below: correct vs incorrect for accuracy, long vs short for length), ``ig_reference``
            (Integrated Gradients of the teacher-forced likelihood of reference solutions).
        reward: a built-in reward name, an import path ``pkg.module:function``, or a mapping of weights.
        advantage: ``rloo`` (default, unbiased), ``grpo`` (the paper's), or ``none``.
        steps: number of quadrature points q (paper: 10).
        rule: quadrature rule: ``gauss_legendre`` (default: the scores add up to the surrogate's
            change at the same cost), ``right`` (the paper's alpha_k = k/q), ``left``, ``midpoint``,
            ``trapezoid``.
        baseline: the baseline gate value c' (paper: 0).
        estimation: ``fixed`` (sample once at c = 1, teacher-force at every point) or ``resample``
            (fresh on-policy samples at every point; N x q generations per prompt).
        path: ``layer`` (each site's gates move alone) or ``family`` (all sites of a family together).
        credit: ``full`` (backward carries a component's effect at position t to every later token)
            or ``local`` (only to the token predicted at t: the paper's per-position formula read
            literally; :mod:`ipg_lightning.rollout.passes.local_credit`). Local scores are not the gradient of one
            surrogate, so completeness does not hold for them.
        sampling: how trajectories are sampled (N, temperature, top-p, max new tokens, stop strings,
            generation batch size, seed); the seed also draws the ``random`` baseline.
        signal_retries: for ``ipg`` and ``grad_x_act`` with fixed estimation, redraw the N samples
            of a prompt whose N rewards are all equal (fresh sample indices), up to this many
            times, and keep the first group whose rewards differ; 0 skips such prompts. Redrawn
            groups and their tokens are counted in the report.
        surrogate: for ``ipg`` and ``grad_x_act`` with fixed estimation, how each trajectory's
            log-likelihood enters the surrogate: ``sum`` over its tokens (the paper's),
            ``token_mean`` (divided by its length, which removes the length term that makes
            components that damage the model score as lengthening under a length reward), or
            ``auto`` (default: ``token_mean`` when the reward names ``reasoning_length``, else
            ``sum``; :func:`~ipg_lightning.attribution.methods.resolve_surrogate`). The report
            records the one used.
        chunk_size: trajectories per teacher-forced forward/backward (bounds memory).
        reuse_prefix: with fixed estimation, run the frozen blocks below the lowest attributed block
            once per chunk instead of once per quadrature point (the same scores, less work).
        memory: bounds for long traces (:class:`~ipg_lightning.rollout.passes.teacher_forced.MemoryLimits`): tokens per
            chunk, or a budget in GiB that chooses them, and activation checkpointing of the blocks
            from the attributed one up. The report records the peak memory of the run.
        architecture: module paths for an architecture that is not built in.
        saes: SAE directories (SAELens, sparsify or dictionary_learning layout) to splice in; their
            features are the ``sae_feature`` family at the SAEs' layers.
        keep_trajectories: keep every sampled trajectory with its reward and advantage in the report
            (``trajectories.json``), for ``ipg explore``; methods that sample only.
        output_dir: where the report is written at the end of validation (None: keep it in memory).
        overwrite: replace an earlier report of this library at ``output_dir``.
    """

    def __init__(
        self,
        model_path: str = "tiny:llama",
        dtype: str = "float32",
        families: list[SiteFamilyName] = ["resid_post"],  # noqa: B006 (jsonargparse needs a literal default)
        layers: list[int] | None = None,
        method: AttributionMethodName = "ipg",
        reward: str | dict[str, float] = "accuracy",
        advantage: AdvantageMethod = "rloo",
        steps: int = 10,
        rule: QuadratureRule = "gauss_legendre",
        baseline: float = 0.0,
        estimation: Literal["fixed", "resample"] = "fixed",
        path: Literal["layer", "family"] = "layer",
        credit: Literal["full", "local"] = "full",
        sampling: SamplingConfig = SamplingConfig(),
        signal_retries: int = 0,
        surrogate: SurrogateChoice = "auto",
        chunk_size: int = 8,
        reuse_prefix: bool = True,
        memory: MemoryLimits = MemoryLimits(),
        architecture: ArchitectureSpec | None = None,
        saes: list[str] = [],  # noqa: B006 (jsonargparse needs a literal default)
        keep_trajectories: bool = False,
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__(model_path, dtype, architecture)
        sampling = SamplingConfig(**sampling) if isinstance(sampling, dict) else sampling
        surrogate = resolve_surrogate(surrogate, method, estimation, advantage, reward)
        self.settings = MethodSettings(advantage, steps, rule, baseline, estimation, path, signal_retries, chunk_size, surrogate)
        check_method(method, self.settings, sampling, keep_trajectories)
        check_sites_and_credit(families, layers, saes, credit)
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)  # refuse now rather than after the run
        self.save_plain_hyperparameters()
        self.reward_fn = load_reward(reward)
        self.reward_name = reward_record(reward)
        self.sampling = sampling
        self.memory = MemoryLimits(**memory) if isinstance(memory, dict) else memory
        self.method = METHODS[method](self)
        self.gates: ComponentGates | None = None
        self.accumulator: AttributionAccumulator | None = None
        self.report: AttributionReport | None = None
        self.kept: KeptTrajectories | None = None
        self.started_at = 0.0
        self.run_memory = RunMemory("cpu")

    def configure_components(self) -> None:
        """SAEs spliced in, gates on the attributed sites (default: the block at 3/4 depth), the score accumulator."""
        layers = self.hparams.layers if self.hparams.layers is not None else [default_layer(self.lm, self.architecture)]
        attach_saes(self.lm, self.hparams.saes, self.architecture)
        self.gates = ComponentGates.for_model(self.lm, self.hparams.families, layers, self.architecture)
        self.accumulator = AttributionAccumulator({name: site.size for name, site in self.gates.sites.items()})

    def on_validation_start(self) -> None:
        """Refuse to run under inference mode, where gate gradients cannot exist; keep gates in float32."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("IPG attribution needs gradients inside validation: create the Trainer with inference_mode=False")
        # A "bf16-true"/"16-true" Trainer converts every parameter; gates must keep full precision
        # (quadrature points like 0.1 and their gradients); each edit casts them to the activation dtype.
        self.gates.float()
        self.accumulator.reset()
        self.kept = KeptTrajectories(self.sampling.num_samples) if self.hparams.keep_trajectories else None
        self.started_at = time.perf_counter()
        self.run_memory = RunMemory(self.device)
        if self.memory.budget_gb is not None and not peak_is_resettable(self.device):  # before any sampling
            raise ValueError("memory.budget_gb needs a peak-memory counter that can be reset (CUDA, or Linux /proc); set memory.chunk_tokens instead")

    def validation_step(self, batch: ReasoningBatch, batch_idx: int) -> None:
        """One attribution step of the method over a batch of prompts; results go to the accumulator."""
        with torch.enable_grad(), self.gates.attach(self.lm), self.run_memory.step():
            self.method.step(batch)

    def teacher_forced_passes(self, reuse_prefix: bool | None = None) -> TeacherForcedPasses:
        """How the passes over one set of trajectories run: chunks by rows and tokens, replayed and checkpointed blocks."""
        first_live_layer = first_live_block(self.lm, self.gates.sites.values(), self.architecture)
        reuse = self.hparams.reuse_prefix if reuse_prefix is None else reuse_prefix
        local = self.hparams.credit == "local"
        passes = TeacherForcedPasses(self.lm, self.settings.chunk_size, first_live_layer, self.memory, reuse, self.architecture, local)
        return self.run_memory.planned(passes)

    # ----------------------------------------------------------------------------- what methods use
    def sample(self, batch: ReasoningBatch, first_sample: int = 0) -> Trajectories:
        """N trajectories per prompt of the batch from the model as currently gated (sample indices from ``first_sample``)."""
        return sample_trajectories(self.lm, self.tokenizer, batch["prompt"], self.sampling, batch["seed"].tolist(), first_sample=first_sample)

    def rewards(self, batch: ReasoningBatch, trajectories: Trajectories) -> torch.Tensor:
        """The (prompts x N) reward matrix of the batch's trajectories."""
        return reward_matrix(self.reward_fn, trajectories, batch["prompt"], batch["answer"], self.tokenizer)

    def keep(self, batch: ReasoningBatch, trajectories: Trajectories, rewards: torch.Tensor, advantages: torch.Tensor | None = None) -> None:
        """Keep a batch's scored trajectories for the report (with ``keep_trajectories``)."""
        if self.kept is not None:
            self.kept.add(batch, trajectories, rewards, advantages, self.tokenizer)

    @staticmethod
    def sample_counts(batch: ReasoningBatch, trajectories: Trajectories, rewards: torch.Tensor) -> dict[str, float]:
        """Counters of a sampled step: prompts, trajectories, completion tokens, summed reward."""
        return {
            "prompts": len(batch["prompt"]),
            "trajectories": len(trajectories),
            "tokens": trajectories.num_completion_tokens,
            "reward_sum": rewards.sum().item(),
        }

    # ----------------------------------------------------------------------------- the report
    def on_validation_epoch_end(self) -> None:
        """Reduce the state across processes, build the report, and write it on rank 0."""
        state = self.accumulator.compute()
        self.accumulator.reset()
        self.report = self._build_report(state)
        self.log("mean_reward", float(self.report.metadata.mean_reward or 0.0), sync_dist=False)
        output_dir = self.hparams.output_dir
        reason = self._uninformative_reason(state) or self.report.uninformative_reason()
        if reason is not None:  # refuse to hand out scores that rank nothing; the report stays in memory
            self.report.metadata.degenerate = reason
            written = " No report was written." if output_dir else ""
            raise UninformativeReportError(f"The attribution carries no information: {reason}.{written}")
        counts = self.report.metadata.counts
        if advice := scarce_signal_advice(self.hparams.method, self.settings, counts.prompts, counts.zero_signal_prompts, self.sampling.num_samples):
            rank_zero_warn(advice)
        if output_dir and self.trainer.is_global_zero:
            self.report.save(output_dir, overwrite=self.hparams.overwrite, extra_files=partial(plot_report, self.report))

    def _uninformative_reason(self, state: dict[str, Any]) -> str | None:
        if int(state["prompts"]) == 0:
            return "no support prompt was attributed (the validation split is empty)"
        return self.method.uninformative_reason(state)

    def _build_report(self, state: dict[str, Any]) -> AttributionReport:
        scores = self.method.scores(state)
        # torchmetrics squeezes one-element results to 0-dim; sub-layer sites keep their (1,) shape.
        scores = {name: scores[name].reshape(site.size) for name, site in self.gates.sites.items()}
        sites = {name: {"family": s.family, "layer": s.layer, "size": s.size} for name, s in self.gates.sites.items()}
        kept = gathered(self.kept) if self.kept is not None else None
        return AttributionReport(scores=scores, sites=sites, metadata=report_metadata(self, state), trajectories=kept)


def report_metadata(module: IPGAttribution, state: dict[str, Any]) -> ReportMetadata:
    """The report's metadata: the method and its settings, the model's identity, data, counts, timings and the completeness block."""
    datamodule = getattr(module.trainer, "datamodule", None)
    rule, steps = module.method.quadrature
    method_counts = module.method.counts(state)
    counts = ReportCounts(
        prompts=int(state["prompts"]),
        trajectories=int(state["trajectories"]),
        completion_tokens=int(state["tokens"]),
        zero_signal_prompts=method_counts["zero_signal_prompts"],
        above_mean_trajectories=method_counts["above_mean_trajectories"],
        redrawn_groups=int(state["redrawn_groups"]),
        redrawn_tokens=int(state["redrawn_tokens"]),
    )
    target, local = module.method.completeness_target(), module.hparams.credit == "local"
    return ReportMetadata(
        method=module.hparams.method,
        config={**module.plain_hparams(), "reward": module.reward_name, "surrogate": module.settings.surrogate},
        effective=Quadrature(steps=steps, rule=rule),
        model=module.model_path,
        model_identity=model_identity(module.lm, module.model_path),
        data={"source": getattr(datamodule, "source", None), "split": "val", "seed": getattr(datamodule, "seed", None)},
        counts=counts,
        mean_reward=state["reward_sum"] / state["trajectories"] if state["trajectories"] else None,
        wall_time_s=round(time.perf_counter() - module.started_at, 3),
        memory=module.run_memory.record(),
        world_size=module.trainer.world_size,
        # where the sae_feature sites' SAEs come from: steering and evaluating the report attach them again
        saes={name: site.sae.source or IN_MEMORY_SAE for name, site in module.gates.sites.items() if site.sae is not None},
        sampling=sampling_record(module.sampling),
        protocol=protocol_record(None, module.sampling, getattr(datamodule, "template", PromptTemplate()), module.tokenizer),
        completeness=Completeness.from_state(state, target, local) if module.method.has_completeness else None,
    )


def run_attribution(
    module: IPGAttribution, datamodule: L.LightningDataModule, device: str | torch.device = "cpu", **trainer_kwargs: Any
) -> AttributionReport:
    """One attribution pass (``Trainer(inference_mode=False).validate``) and its report.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) picks the Trainer's accelerator; ``trainer_kwargs`` go
    to the ``Trainer`` (e.g. ``enable_progress_bar=False``, ``devices=2``). By default it runs on the
    CPU with no logger and no model summary.
    """
    device = torch.device(device)
    placement = {"accelerator": "gpu", "devices": [device.index or 0]} if device.type == "cuda" else {"accelerator": device.type}
    settings = {**placement, "logger": False, "enable_model_summary": False, **trainer_kwargs, "inference_mode": False}
    L.Trainer(**settings).validate(module, datamodule=datamodule, verbose=False)
    return module.report
