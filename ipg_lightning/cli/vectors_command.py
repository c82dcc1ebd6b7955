"""``ipg vectors``: build a steering-vector file from a contrast of the model's own trajectories, from SAE features,
or from the vectors an ``ipg steer`` checkpoint learned."""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

from torch import nn

from ipg_lightning.checks import check_device
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.data.sources import SPLITS
from ipg_lightning.metrics.functional import DEFAULT_REFLECTION_MARKERS
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.loading import load_model_and_tokenizer, model_directory
from ipg_lightning.rewards.functions import load_reward
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import load_sae
from ipg_lightning.steering.learned import load_steering_checkpoint
from ipg_lightning.steering.vector_sources import contrast_vectors, reflection_vectors, sae_direction_vectors
from ipg_lightning.vectors import VECTOR_FAMILIES, SteeringVectors, save_vectors
from ipg_lightning.vectors.additive import VectorPositions
from ipg_lightning.vectors.files import check_vector_output

logger = logging.getLogger(__name__)

#: Sampling for a contrast: N = 8 samples of each problem at the usual reasoning temperature.
CONTRAST_SAMPLING = SamplingConfig(num_samples=8, temperature=0.6, top_p=0.95, max_new_tokens=512)


def vectors(
    output: str,
    model_path: str | None = None,
    source: Literal["contrast", "reflection", "sae", "checkpoint"] = "contrast",
    reward: str = "accuracy",
    families: list[str] = ["resid_post"],  # noqa: B006 (jsonargparse needs a literal default)
    layers: list[int] | None = None,
    data: ReasoningDataModule | None = None,
    split: str = "val",
    sampling: SamplingConfig = CONTRAST_SAMPLING,
    markers: list[str] = list(DEFAULT_REFLECTION_MARKERS),  # noqa: B006 (jsonargparse needs a literal default)
    sae: str | None = None,
    features: list[int] | None = None,
    checkpoint: str | None = None,
    unit: bool = True,
    alpha: float = 1.0,
    positions: VectorPositions = "all",
    dtype: str = "float32",
    device: str = "auto",
    overwrite: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Build steering vectors and write them to a ``.safetensors`` file, with the model and where they come from.

    ``--source contrast`` samples N completions of each problem of ``split`` (the support split by
    default, never the test split you evaluate on), scores them with ``reward``, and takes the mean
    activation over generated tokens of the completions above their problem's mean reward minus that
    of those below: correct minus incorrect for ``accuracy``, long minus short for
    ``reasoning_length`` (so a negative alpha shortens). ``--source reflection`` samples traces of
    ``split``, cuts each into thoughts at its line breaks, and takes the mean activation over execution
    thoughts minus that over reflection thoughts (those holding one of ``markers``), SEAL-style, so a
    positive alpha steers away from re-checking. ``--source sae`` takes the decoder direction of
    ``features`` of the SAE at ``sae``, where that SAE reads. ``--source checkpoint`` writes the vectors
    an ``ipg steer`` checkpoint learned (``--model.vectors.*``), so their strength can be swept and
    their direction shown like any other vector's. Use the file with ``ipg evaluate --vectors FILE``
    (``--alphas`` sweeps the strength), ``ipg lm-eval --vectors FILE`` and ``ipg explore --vectors``.

    Args:
        output: the ``.safetensors`` file to write (refused if it exists, unless ``overwrite``).
        model_path: local model directory or alias (``tiny-reasoner``, ``smollm2``); for ``checkpoint``, default
            the model it was trained on.
        source: ``contrast`` (of rewarded trajectories), ``reflection`` (of the thoughts within traces), ``sae``
            (an SAE feature's decoder direction) or ``checkpoint`` (vectors learned by ``ipg steer``).
        reward: what the contrast separates (a built-in reward name or ``pkg.module:function``; source ``contrast``).
        families: where the vectors go: ``resid_post``, ``attn_out``, ``mlp_out`` (contrast, reflection).
        layers: blocks (contrast, reflection); default the block at 3/4 depth, as attribution.
        data: the problems (``--data.source``, ``--data.num_val``, ...).
        split: which split the contrast samples (``val``, the support split, by default).
        sampling: how the contrast samples (N >= 2 at a temperature > 0 for ``contrast``; ``--sampling.engine vllm`` works).
        markers: phrases that make a thought a reflection (source ``reflection``; the reflection rate's by default).
        sae: the SAE directory (source ``sae``).
        features: the SAE features whose decoder directions are added up (source ``sae``).
        checkpoint: an ``ipg steer`` checkpoint that learned vectors (source ``checkpoint``).
        unit: scale an SAE direction to norm 1, so alpha is the norm of what is added.
        alpha: the strength stored with the vectors (``ipg evaluate --alpha`` overrides it); for ``checkpoint``,
            relative to the strength they were trained at (1: as trained).
        positions: where the vectors are added when used: ``all`` positions, or ``generated`` tokens only
            (each decode step; HF engine only, and carried by export rather than folded).
        dtype: weights dtype.
        device: where the model runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: replace an earlier vector file at ``output`` (never any other file).
        architecture: module paths of a decoder that is not built in (see ``ArchitectureSpec``).
    """
    path = check_vector_output(output, overwrite)
    if not math.isfinite(alpha):
        raise ValueError(f"--alpha must be a finite number, got {alpha}")
    wrong = [family for family in families if family not in VECTOR_FAMILIES]
    if wrong:
        raise ValueError(f"Steering vectors are added at {list(VECTOR_FAMILIES)} sites only, got families {wrong}")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {list(SPLITS)}")
    if (source == "checkpoint") != (checkpoint is not None):
        raise ValueError("--checkpoint CKPT goes with --source checkpoint (the vectors an `ipg steer` run learned), and that source needs one")
    if source != "checkpoint" and model_path is None:
        raise ValueError(f"--source {source} needs the model: give --model_path (a local directory, or an alias such as tiny-reasoner)")
    if source == "checkpoint" and positions != "all":
        raise ValueError("Learned vectors were trained at every position: --source checkpoint keeps --positions all")
    if source == "checkpoint":
        given = {
            "--families": families != ["resid_post"],
            "--layers": layers is not None,
            "--reward": reward != "accuracy",
            "--data": data is not None,
            "--markers": markers != list(DEFAULT_REFLECTION_MARKERS),
            "--sampling": sampling != CONTRAST_SAMPLING,
            "--architecture": architecture is not None,
        }
        if any(given.values()):
            wrong = ", ".join(name for name, was_given in given.items() if was_given)
            raise ValueError(f"{wrong} build vectors from the model's trajectories; --source checkpoint takes the learned ones as they are")
    if source == "sae" and (sae is None or not features):
        raise ValueError("--source sae needs the SAE directory (--sae DIR) and its features (--features '[17, 40]')")
    if source != "sae" and (sae is not None or features):
        raise ValueError(f"--sae and --features belong to --source sae; --source {source} reads the model's own activations")
    if source == "contrast":
        load_reward(reward)  # an unknown reward is refused before the model loads
        if sampling.num_samples < 2 or sampling.temperature == 0:
            raise ValueError("A contrast needs differing samples of each problem: --sampling.num_samples >= 2 and --sampling.temperature > 0")
    if source == "reflection" and not markers:
        raise ValueError("--source reflection needs at least one reflection marker (--markers '[\"wait\"]')")
    if source != "sae" and split == "test":
        raise ValueError(f"--source {source} is built on the support split (val) or train, never on the test split it is evaluated on")
    target = check_device(device)
    if source == "checkpoint":
        built, model, directory = learned_vectors(checkpoint, model_path)
        built.alpha = alpha * built.alpha
        save_vectors(built, path, model, str(directory), overwrite=overwrite)
        return _report(path, built)
    directory = model_directory(model_path)
    model, tokenizer = load_model_and_tokenizer(directory, dtype)
    model.to(target)
    if source == "sae":
        built = sae_direction_vectors(model, load_sae(sae), features, unit)  # where the SAE reads: --families/--layers do not apply
    else:
        data = data or ReasoningDataModule()
        data.connect(tokenizer)
        batches = list(data.dataloader(split))
        prompts = [prompt for batch in batches for prompt in batch["prompt"]]
        golds = [gold for batch in batches for gold in batch["answer"]]
        if not prompts:
            raise ValueError(f"The {split} split of {data.source} is empty: give it problems (e.g. --data.num_{split} 64)")
        if source == "reflection":
            built = reflection_vectors(model, tokenizer, prompts, families, layers, sampling, markers, progress=True, architecture=architecture)
        else:
            built = contrast_vectors(model, tokenizer, prompts, golds, reward, families, layers, sampling, progress=True, architecture=architecture)
        built.provenance |= {"data": data.source, "split": split}
    built.alpha = alpha
    built.positions = positions
    save_vectors(built, path, model, str(directory), overwrite=overwrite)
    return _report(path, built)


def _report(path: Any, built: SteeringVectors) -> dict[str, Any]:
    """Print and return what was written."""
    summary = {"output": str(path), "alpha": built.alpha, "positions": built.positions, "norms": built.norms(), "provenance": built.provenance}
    print(json.dumps(summary, indent=2, default=str))
    return summary


def learned_vectors(checkpoint: str, model_path: str | None = None) -> tuple[SteeringVectors, nn.Module, str]:
    """The vectors an ``ipg steer`` checkpoint learned (with where they come from in their provenance), the model
    they are on, and its path; refused in one line for a checkpoint that learned none."""
    module = load_steering_checkpoint(checkpoint, model=model_path)
    if module.vectors is None:
        raise ValueError(f"{checkpoint} learned no steering vectors, only gates; `ipg steer --model.vectors.layers '[L]'` learns them")
    if module.components or module.fine_tune.adapter is not None or module.fine_tune.slices:
        logger.warning("%s learned its vectors beside gates or weights; the file holds the vectors alone, which are not all it learned", checkpoint)
    vectors = module.vectors
    vectors.provenance = {
        **vectors.provenance,
        "checkpoint": str(checkpoint),
        "objective": module.hparams.objective,
        "reward": module.hparams.reward,
        "learned_beside": list(module.components),
        "fine_tune": "lora" if module.fine_tune.adapter is not None else "weight_slices" if module.fine_tune.slices else None,
    }
    return vectors, module.lm, module.model_path
