"""``ipg vectors``: build a steering-vector file from a contrast of the model's own trajectories, or from SAE features."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from ipg_lightning.checks import check_device
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.data.sources import SPLITS
from ipg_lightning.metrics.functional import DEFAULT_REFLECTION_MARKERS
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.loading import load_model_and_tokenizer, model_directory
from ipg_lightning.rewards.functions import load_reward
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import load_sae
from ipg_lightning.steering.vector_sources import contrast_vectors, reflection_vectors, sae_direction_vectors
from ipg_lightning.vectors import VECTOR_FAMILIES, save_vectors
from ipg_lightning.vectors.additive import VectorPositions
from ipg_lightning.vectors.files import check_vector_output

#: Sampling for a contrast: N = 8 samples of each problem at the usual reasoning temperature.
CONTRAST_SAMPLING = SamplingConfig(num_samples=8, temperature=0.6, top_p=0.95, max_new_tokens=512)


def vectors(
    output: str,
    model_path: str,
    source: Literal["contrast", "reflection", "sae"] = "contrast",
    reward: str = "accuracy",
    families: list[str] = ["resid_post"],  # noqa: B006 (jsonargparse needs a literal default)
    layers: list[int] | None = None,
    data: ReasoningDataModule | None = None,
    split: str = "val",
    sampling: SamplingConfig = CONTRAST_SAMPLING,
    markers: list[str] = list(DEFAULT_REFLECTION_MARKERS),  # noqa: B006 (jsonargparse needs a literal default)
    sae: str | None = None,
    features: list[int] | None = None,
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
    ``features`` of the SAE at ``sae``, where that SAE reads. Use the file with ``ipg evaluate
    --vectors FILE`` (``--alphas`` sweeps the strength) and ``ipg lm-eval --vectors FILE``.

    Args:
        output: the ``.safetensors`` file to write (refused if it exists, unless ``overwrite``).
        model_path: local model directory or alias (``tiny-reasoner``, ``smollm2``).
        source: ``contrast`` (of rewarded trajectories), ``reflection`` (of the thoughts within traces) or ``sae``
            (an SAE feature's decoder direction).
        reward: what the contrast separates (a built-in reward name or ``pkg.module:function``; source ``contrast``).
        families: where the vectors go: ``resid_post``, ``attn_out``, ``mlp_out`` (contrast, reflection).
        layers: blocks (contrast, reflection); default the block at 3/4 depth, as attribution.
        data: the problems (``--data.source``, ``--data.num_val``, ...).
        split: which split the contrast samples (``val``, the support split, by default).
        sampling: how the contrast samples (N >= 2 at a temperature > 0 for ``contrast``; ``--sampling.engine vllm`` works).
        markers: phrases that make a thought a reflection (source ``reflection``; the reflection rate's by default).
        sae: the SAE directory (source ``sae``).
        features: the SAE features whose decoder directions are added up (source ``sae``).
        unit: scale an SAE direction to norm 1, so alpha is the norm of what is added.
        alpha: the strength stored with the vectors (``ipg evaluate --alpha`` overrides it).
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
    summary = {"output": str(path), "alpha": built.alpha, "positions": built.positions, "norms": built.norms(), "provenance": built.provenance}
    print(json.dumps(summary, indent=2, default=str))
    return summary
