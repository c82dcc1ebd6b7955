"""Train a TopK sparse autoencoder on one site's activations of a frozen model (``ipg train-sae``).

Each training step reads the site's activations on a batch of texts (the data module's prompts,
or with ``traces`` prompts followed by completions the model samples itself, where the reasoning
features live) and takes one Adam step on the SAE. The practice follows Gao et al. (2024),
"Scaling and evaluating sparse autoencoders":

- inputs are scaled by one constant so their mean norm is sqrt(d_in) (as SAELens'
  ``expected_average_only_in`` does while training); the constant is folded into the weights when saved;
- ``b_dec`` starts at the activations' mean, the decoder rows are random unit vectors and the
  encoder starts as the decoder's transpose;
- decoder rows are kept at unit norm (the gradient component along each row is removed before the
  step, and rows are renormalised after it);
- an auxiliary loss (AuxK) lets the ``aux_k`` largest pre-activations of *dead* features (none fired
  for ``dead_after_tokens`` tokens) reconstruct the residual error, so they come back to life.

The objective itself is in :mod:`ipg_lightning.sae.topk_objective`; this module runs it.

Validation logs torchmetrics: the fraction of variance unexplained, L0, the dead-feature fraction,
and the change in the model's next-token loss (on sampled completions when ``traces`` is set) when
the reconstruction replaces the activation, beside the change when the activation's mean replaces it
(the reference the card's ``loss_recovered`` is measured against).
The initialisation statistics, the dead-feature counts and the metrics reduce over DDP ranks, so
the module runs under DDP unchanged and every rank holds the same SAE.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import MeanMetric

from ipg_lightning.checks import check_at_least
from ipg_lightning.data import ReasoningBatch
from ipg_lightning.model.autoencoder import SparseAutoencoder
from ipg_lightning.model.families import ArchitectureSpec, sae_point
from ipg_lightning.model.sites import Site, find_site, unwrap_model
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories, teacher_forced_trajectories
from ipg_lightning.sae.activations import SitePass, site_pass
from ipg_lightning.sae.metrics import DeadFeatureFraction, FractionOfVarianceUnexplained, loss_recovered
from ipg_lightning.sae.topk_objective import initialise_from_activations, project_decoder_gradient, renormalise_decoder, topk_losses
from ipg_lightning.task import ReasoningTask

#: Bytes per SAE weight while training: the weight, its gradient and Adam's two moments, in float32.
TRAINING_BYTES_PER_WEIGHT = 16


def _available_memory() -> int:
    """Bytes of memory the system can give (Linux's MemAvailable, which counts reclaimable cache; else the free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(d_in: int, d_sae: int, expansion: int, device: torch.device) -> None:
    """Refuse, before allocating, an SAE whose two matrices with their training state exceed the free memory of ``device``."""
    needed = 2 * d_in * d_sae * TRAINING_BYTES_PER_WEIGHT
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_memory()
    if needed > free:
        raise ValueError(
            f"expansion {expansion} gives an SAE of {d_sae} features over {d_in} channels, which needs {needed / 2**30:.1f} GiB to train; "
            f"{device.type} has {free / 2**30:.1f} GiB free: lower expansion"
        )


class SAETraining(ReasoningTask):
    """Train a TopK SAE on the activations at ``hook_name`` of a frozen causal LM.

    Args:
        model_path: the model (a local directory, or a name such as ``tiny-reasoner``).
        dtype: weights dtype of the model.
        hook_name: where the SAE reads (``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``,
            ``blocks.L.hook_attn_out``).
        expansion: features per input channel (``d_sae = expansion * d_in``).
        k: active features per token.
        learning_rate: Adam learning rate.
        aux_k: dead features the auxiliary loss may use per token (default ``d_in // 2``).
        aux_coefficient: weight of the auxiliary loss (Gao et al.: 1/32).
        dead_after_tokens: a feature that has not fired for this many training tokens is dead.
        traces: sample completions of each prompt with these settings and read the activations on
            prompt and completion tokens (None: prompts only).
        seed: seed of the initial weights.
        architecture: module paths for a decoder that is not built in.
    """

    def __init__(
        self,
        model_path: str = "tiny-reasoner",
        dtype: str = "float32",
        hook_name: str = "blocks.2.hook_resid_post",
        expansion: int = 8,
        k: int = 16,
        learning_rate: float = 1e-3,
        aux_k: int | None = None,
        aux_coefficient: float = 1 / 32,
        dead_after_tokens: int = 20_000,
        traces: SamplingConfig | None = None,
        seed: int = 0,
        architecture: ArchitectureSpec | None = None,
    ) -> None:
        super().__init__(model_path, dtype, architecture)
        try:
            sae_point(hook_name)  # an unsupported hook point fails here, before the model loads
        except ValueError as error:
            raise ValueError(f"hook_name: {error}") from None
        check_at_least(1, expansion=expansion, k=k, dead_after_tokens=dead_after_tokens)
        if aux_k is not None:
            check_at_least(1, aux_k=aux_k)
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
        if not (math.isfinite(aux_coefficient) and aux_coefficient >= 0):
            raise ValueError(f"aux_coefficient must be a finite number >= 0, got {aux_coefficient}")
        self.save_plain_hyperparameters()
        self.strict_loading = False  # checkpoints hold the SAE and its training state, not the frozen model
        self.traces = SamplingConfig(**traces) if isinstance(traces, dict) else traces
        self.sae: SparseAutoencoder | None = None
        self.site: Site | None = None

    def configure_components(self) -> None:
        """Find the site the SAE reads and create the SAE (initialised from data at the first step)."""
        site_name = sae_point(self.hparams.hook_name).activation_name
        try:
            self.site = find_site(self.lm, site_name, self.architecture)
        except ValueError as error:
            raise ValueError(f"hook_name {self.hparams.hook_name}: {error}") from None
        d_in = unwrap_model(self.lm).config.hidden_size
        d_sae = self.hparams.expansion * d_in
        if self.hparams.k > d_sae:
            raise ValueError(f"k = {self.hparams.k} exceeds the SAE's {d_sae} features")
        check_fits_in_memory(d_in, d_sae, self.hparams.expansion, next(self.lm.parameters()).device)
        self.sae = SparseAutoencoder(d_in, d_sae, site_name, activation="topk", k=self.hparams.k, normalization="constant_scale")
        self.aux_k = min(self.hparams.aux_k or d_in // 2, d_sae)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long), persistent=True)
        self.register_buffer("initialised", torch.tensor(False), persistent=True)
        self.fvu = FractionOfVarianceUnexplained(d_in)
        self.dead = DeadFeatureFraction(d_sae)
        self.l0 = MeanMetric()
        self.loss_increase = MeanMetric()
        self.ablation_loss_increase = MeanMetric()

    # ------------------------------------------------------------------------------- activations
    def texts(self, batch: ReasoningBatch) -> Trajectories:
        """The batch's prompts, followed by sampled completions when ``traces`` is set."""
        if self.traces is None:
            return teacher_forced_trajectories(self.tokenizer, batch["prompt"], [""] * len(batch["prompt"]))
        return sample_trajectories(self.lm, self.tokenizer, batch["prompt"], self.traces, prompt_seeds=batch["seed"].tolist())

    def _forward(self, trajectories: Trajectories, replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SitePass:
        """The site's activations and the next-token losses; the loss that matters is on the reasoning
        (sampled completions), or on every next token of prompts alone. ``replace``: continue from ``replace(activation)``."""
        return site_pass(self.lm, self.site, trajectories, replace, completions_only=self.traces is not None)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: ReasoningBatch, batch_idx: int) -> torch.Tensor:
        """One Adam step of the SAE on the batch's activations."""
        activations, _, _ = self._forward(self.texts(batch))
        reduce = self.trainer.strategy.reduce  # statistics over all DDP ranks, so every rank holds the same SAE
        if not self.initialised:
            initialise_from_activations(self.sae, activations, self.hparams.seed, reduce)
            self.initialised.fill_(True)
        dead = self.tokens_since_fired >= self.hparams.dead_after_tokens
        loss, aux, features = topk_losses(self.sae, activations, dead, self.aux_k)
        # A feature that fires on any rank is alive.
        fired = reduce((features != 0).any(0).float(), reduce_op="sum") > 0
        tokens = int(reduce(torch.tensor(float(activations.shape[0]), device=self.device), reduce_op="sum"))
        self.tokens_since_fired.add_(tokens).masked_fill_(fired, 0)
        dead_fraction = (self.tokens_since_fired >= self.hparams.dead_after_tokens).float().mean()
        size = activations.shape[0]
        self.log_dict({"train/fvu": loss, "train/aux_loss": aux, "train/dead_fraction": dead_fraction}, prog_bar=True, batch_size=size)
        return loss + self.hparams.aux_coefficient * aux

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the decoder rows at unit norm to first order (see :func:`project_decoder_gradient`)."""
        project_decoder_gradient(self.sae)

    def on_train_batch_end(self, outputs: Any, batch: ReasoningBatch, batch_idx: int) -> None:
        """Put the decoder rows back at unit norm; stop if the step made any weight NaN or infinite."""
        renormalise_decoder(self.sae)
        self.check_finite(f"at step {self.global_step}")

    def check_sae_trained(self, metrics: dict[str, float]) -> None:
        """Refuse to hand out an SAE that never trained, holds NaN or inf, or reconstructs worse than the activations' mean.

        ``metrics`` are the validation metrics (``fvu``, ...). An FVU above 1 means the reconstruction
        explains less than a constant: the training diverged without overflowing.
        """
        if self.global_step == 0 or not self.initialised:
            raise ValueError("No training step ran (trainer.max_epochs or max_steps is 0, or the train split is empty): nothing was saved")
        self.check_finite("after training")
        broken = [key for key, value in metrics.items() if not math.isfinite(value)]
        if broken:
            raise FloatingPointError(f"The trained SAE's {', '.join(broken)} measured non-finite: it does not reconstruct, and nothing was saved")
        if metrics["fvu"] > 1:
            raise FloatingPointError(
                f"The trained SAE reconstructs worse than the activations' mean (validation FVU {metrics['fvu']:.3g} > 1): the training "
                f"diverged and nothing was saved; lower learning_rate (now {self.hparams.learning_rate:g}) or train longer"
            )

    def check_finite(self, when: str) -> None:
        """Raise ``FloatingPointError`` naming the tensors if the SAE's weights hold NaN or inf (training diverged)."""
        damaged = [name for name, tensor in self.sae.state_dict().items() if not torch.isfinite(tensor).all()]
        if damaged or not math.isfinite(self.sae.input_scale):
            raise FloatingPointError(
                f"The SAE's {', '.join(damaged) or 'input scale'} became non-finite {when}: the training diverged and nothing was saved; "
                f"lower learning_rate (now {self.hparams.learning_rate:g}) and start again"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the SAE's trainable parameters (the model is frozen)."""
        return torch.optim.Adam([p for p in self.sae.parameters() if p.requires_grad], lr=self.hparams.learning_rate)

    # -------------------------------------------------------------------------------- validation
    def validation_step(self, batch: ReasoningBatch, batch_idx: int) -> None:
        """Reconstruction, sparsity and the model's loss with the reconstruction spliced in."""
        trajectories = self.texts(batch)
        activations, clean, mask = self._forward(trajectories)
        _, spliced, _ = self._forward(trajectories, self.sae)
        mean = activations.mean(0)  # the reference: the site carrying no information about the token
        _, ablated, _ = self._forward(trajectories, lambda z: mean.to(z.dtype).expand_as(z))
        with torch.no_grad():
            features = self.sae.encode(activations)
            self.fvu.update(activations, self.sae.decode(features, activations))
        self.dead.update(features)
        self.l0.update((features != 0).sum(-1).float())
        self.loss_increase.update((spliced - clean)[mask])
        self.ablation_loss_increase.update((ablated - clean)[mask])
        metrics = {"val/fvu": self.fvu, "val/l0": self.l0, "val/dead_fraction": self.dead, "val/loss_increase": self.loss_increase}
        metrics["val/ablation_loss_increase"] = self.ablation_loss_increase
        self.log_dict(metrics, on_epoch=True, batch_size=activations.shape[0])

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the SAE and its training state, not the frozen model; record the input scale; never save a diverged SAE."""
        self.check_finite(f"at step {self.global_step}")
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("lm.")}
        checkpoint["sae_input_scale"] = self.sae.input_scale

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the input scale (the weights come back through the state dict); refuse a checkpoint without the SAE."""
        self.load_model()
        needed = {key for key in self.state_dict() if not key.startswith("lm.")}
        missing = sorted(needed - set(checkpoint.get("state_dict", {})))
        if missing or "sae_input_scale" not in checkpoint:
            raise ValueError(f"The checkpoint holds no SAE for {self.hparams.hook_name} (missing {missing[:3]}); is it ipg train-sae's?")
        foreign = sorted(set(checkpoint["state_dict"]) - needed)
        if foreign:  # the frozen model is never in such a checkpoint: loading these would replace its weights
            raise ValueError(f"The checkpoint holds tensors beyond the SAE and its training state ({foreign[:3]}); refusing to load them")
        self.sae.input_scale = float(checkpoint["sae_input_scale"])

    def card(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What ``ipg train-sae`` writes beside the SAE: settings, metrics, training volume, and what the loss metrics mean.

        ``loss_recovered`` is explained at :func:`~ipg_lightning.sae.metrics.loss_recovered`.
        """
        measured_on = "prompts" if self.traces is None else "sampled completions"
        recovered, warnings = loss_recovered(metrics, self.sae.hook_name, measured_on)
        return {
            "format": "ipg_lightning SAE card v1",
            "model": self.model_path,
            "hook_name": self.sae.hook_name,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "k": self.sae.k,
            "settings": self.plain_hparams(),
            "steps": self.global_step,
            "metrics": {**metrics, "loss_recovered": recovered},
            "measured_on": measured_on,
            "warnings": warnings,
        }
