"""Where steering vectors come from: contrasts of the model's own trajectories, and SAE decoder directions.

A *contrast vector* is the difference of mean activations between two sets of the model's own
sampled trajectories, read over their generated tokens: those above and those below their prompt's
mean reward, within each prompt's N samples (the sides the ``mean_diff`` baseline contrasts;
:func:`~ipg_lightning.rewards.completions.sides_of_the_mean`), taken prompt by prompt and averaged
over the prompts whose samples differ, so that no difference between problems enters it. For
accuracy that is correct minus incorrect answers to the same question; for reasoning length, long
minus short, so a negative ``alpha`` shortens. A *reflection vector* contrasts the thoughts within
traces (SEAL-style): each completion is split into thoughts at its line breaks, a thought holding a
reflection marker (``wait``, ``let me check``, ...: the ones the reflection rate counts) is a
reflection, any other an execution step, and the vector is the mean activation over execution
thoughts minus that over reflection thoughts, so a positive ``alpha`` steers away from re-checking.
An *SAE direction* is one feature's decoder row, added where that SAE reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.activations import component_activations, mean_completion_activations, whole_activation
from ipg_lightning.metrics.functional import DEFAULT_REFLECTION_MARKERS, reflection_pattern
from ipg_lightning.model.autoencoder import SparseAutoencoder
from ipg_lightning.model.families import SAE_POINTS, ArchitectureSpec, sae_point
from ipg_lightning.model.sites import Site, default_layer, unwrap_model
from ipg_lightning.rewards.completions import reward_matrix, sides_of_the_mean
from ipg_lightning.rewards.functions import Reward, load_reward
from ipg_lightning.rollout.sampling import sample_trajectories, sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories
from ipg_lightning.vectors.additive import SteeringVectors


class NoContrastError(ValueError):
    """The sampled trajectories had nothing to contrast (every prompt's rewards were equal)."""


def contrast_vectors(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    golds: Sequence[str | None],
    reward: str | Reward,
    families: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    chunk_size: int = 8,
    progress: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> SteeringVectors:
    """Contrast vectors of ``reward`` at the sites of ``families`` and ``layers``, from N samples of each prompt.

    For each prompt whose N rewards differ: the mean, over its trajectories above its mean reward, of
    their mean activation over generated tokens, minus the same mean below it; each site's vector is
    that difference averaged over those prompts. ``alpha`` starts at 1 (the vector as measured); its
    provenance records the reward, the sampling and the counts of each side.

    Args:
        model: a causal LM (plain or PEFT-wrapped; gates or vectors attached act while it samples and reads).
        tokenizer: its tokenizer.
        prompts: templated prompts.
        golds: each prompt's reference answer (None where the reward needs none).
        reward: a built-in reward name (``accuracy``, ``reasoning_length``), or a reward function.
        families: sites to build vectors at (:data:`~ipg_lightning.vectors.additive.VECTOR_FAMILIES`).
        layers: blocks; default the block at 3/4 depth (as attribution).
        sampling: how trajectories are sampled; ``num_samples`` (N >= 2) per prompt, on HF or vLLM.
        chunk_size: trajectories per forward pass that reads the activations.
        progress: show a progress bar while sampling.
        architecture: module paths of a decoder that is not built in.
    """
    if len(prompts) != len(golds):
        raise ValueError(f"Got {len(golds)} gold answers for {len(prompts)} prompts")
    if sampling.num_samples < 2 or sampling.temperature == 0:
        raise ValueError(
            "A contrast needs differing samples of each prompt: num_samples >= 2 and temperature > 0 "
            f"(got {sampling.num_samples}, {sampling.temperature})"
        )
    vectors = SteeringVectors.for_model(model, families, [default_layer(model, architecture)] if layers is None else layers, architecture)
    scorer = load_reward(reward)
    trajectories = sample_trajectories(model, tokenizer, list(prompts), sampling, progress=progress)
    rewards = reward_matrix(scorer, trajectories, prompts, golds, tokenizer)
    above, below, has_signal = sides_of_the_mean(rewards)
    if not (above.any() and below.any()):
        raise NoContrastError(
            f"The {sampling.num_samples} samples of each of the {len(prompts)} prompts got equal rewards, so there is nothing to contrast: "
            "use problems the model solves sometimes but not always, or more samples"
        )
    sites = list(vectors.sites.values())
    per_row = mean_completion_activations(model, sites, trajectories, chunk_size, read=whole_activation)
    shape = (*rewards.shape, -1)
    above, below = above.view(rewards.shape).float(), below.view(rewards.shape).float()
    for name, values in per_row.items():
        values = values.view(shape)
        per_prompt = (values * above[..., None]).sum(1) / above.sum(1, keepdim=True).clamp(min=1)
        per_prompt -= (values * below[..., None]).sum(1) / below.sum(1, keepdim=True).clamp(min=1)
        vectors.set_vector(name, per_prompt[has_signal].mean(0))
    vectors.provenance = {
        "source": "contrast",
        "contrast": "above minus below each prompt's mean reward (within its N samples), mean over generated tokens",
        "reward": reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__),
        "prompts": len(prompts),
        "signal_prompts": int(has_signal.sum()),
        "above_trajectories": int(above.sum()),
        "below_trajectories": int(below.sum()),
        "mean_reward": float(rewards.mean()),
        "sampling": sampling_record(sampling),
    }
    return vectors


class Thought(NamedTuple):
    """One thought of a completion: its generated tokens ``start:end`` and whether it is a reflection."""

    start: int
    end: int
    reflection: bool


def split_thoughts(tokenizer: PreTrainedTokenizerBase, completion_ids: Sequence[int], pattern: re.Pattern) -> list[Thought]:
    """The thoughts of one completion: its tokens cut after each token that holds a line break (a final
    special token, such as EOS, left out), blank ones skipped, each marked a reflection where its text matches ``pattern``."""
    ids = list(completion_ids)
    if ids and ids[-1] in tokenizer.all_special_ids:
        ids = ids[:-1]
    thoughts, start = [], 0
    for index, token in enumerate(ids):
        if "\n" in tokenizer.decode([token]) or index == len(ids) - 1:
            text = tokenizer.decode(ids[start : index + 1])
            if text.strip():
                thoughts.append(Thought(start, index + 1, pattern.search(text) is not None))
            start = index + 1
    return thoughts


def reflection_vectors(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    families: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    markers: Sequence[str] = DEFAULT_REFLECTION_MARKERS,
    chunk_size: int = 8,
    progress: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> SteeringVectors:
    """Execution-minus-reflection vectors at the sites of ``families`` and ``layers``, from the thoughts of sampled traces.

    Each completion is split into thoughts (:func:`split_thoughts`); each thought's activation is its
    mean over the thought's tokens; each site's vector is the mean over execution thoughts minus the
    mean over reflection thoughts, pooled over all traces (both kinds occur within the same traces).
    ``alpha`` starts at 1; a positive alpha steers away from reflection. No reward is needed.

    Args:
        model: a causal LM (plain or PEFT-wrapped; gates or vectors attached act while it samples and reads).
        tokenizer: its tokenizer.
        prompts: templated prompts.
        families: sites to build vectors at (:data:`~ipg_lightning.vectors.additive.VECTOR_FAMILIES`).
        layers: blocks; default the block at 3/4 depth (as attribution).
        sampling: how the traces are sampled (any N and temperature, on HF or vLLM).
        markers: phrases that make a thought a reflection (matched case-insensitively, whole words).
        chunk_size: trajectories per forward pass that reads the activations.
        progress: show a progress bar while sampling.
        architecture: module paths of a decoder that is not built in.
    """
    pattern = reflection_pattern(markers)
    vectors = SteeringVectors.for_model(model, families, [default_layer(model, architecture)] if layers is None else layers, architecture)
    trajectories = sample_trajectories(model, tokenizer, list(prompts), sampling, progress=progress)
    thoughts = [split_thoughts(tokenizer, ids, pattern) for ids in trajectories.completion_ids]
    counts = {kind: sum(thought.reflection == kind for row in thoughts for thought in row) for kind in (True, False)}
    if not (counts[True] and counts[False]):
        missing = "reflection" if not counts[True] else "execution"
        raise NoContrastError(
            f"The {len(trajectories)} sampled traces hold no {missing} thought (reflection markers: {list(markers)}), "
            "so there is nothing to contrast: use a model and problems whose traces re-check some steps, more samples, or other markers"
        )
    sums = _thought_sums(model, list(vectors.sites.values()), trajectories, thoughts, chunk_size)
    for name, (execution, reflection) in sums.items():
        vectors.set_vector(name, execution / counts[False] - reflection / counts[True])
    vectors.provenance = {
        "source": "reflection",
        "contrast": "execution minus reflection thoughts (split at line breaks; a reflection holds a marker), mean over each thought's tokens",
        "markers": list(markers),
        "prompts": len(prompts),
        "trajectories": len(trajectories),
        "execution_thoughts": counts[False],
        "reflection_thoughts": counts[True],
        "sampling": sampling_record(sampling),
    }
    return vectors


@torch.no_grad()
def _thought_sums(
    model: nn.Module, sites: Sequence[Site], trajectories: Trajectories, thoughts: Sequence[Sequence[Thought]], chunk_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, the sums over execution and over reflection thoughts of each thought's mean activation."""
    width = unwrap_model(model).config.hidden_size
    sums = {site.name: (torch.zeros(width), torch.zeros(width)) for site in sites}
    for rows, chunk in trajectories.chunks(chunk_size):
        captured, _ = component_activations(model, sites, chunk, read=whole_activation)
        offset = max(len(ids) for ids in chunk.prompt_ids)  # completions start after the left-padded prompts
        for local, row in enumerate(rows):
            for thought in thoughts[row]:
                for site in sites:
                    mean = captured[site.name][local, offset + thought.start : offset + thought.end].mean(0).cpu()
                    sums[site.name][int(thought.reflection)].add_(mean)  # (execution, reflection)
    return sums


def sae_direction_vectors(model: nn.Module, sae: SparseAutoencoder, features: Sequence[int], unit: bool = True) -> SteeringVectors:
    """The decoder direction of ``features`` of ``sae`` (summed), as a vector at the site the SAE reads in ``model``.

    With ``unit`` the direction is scaled to norm 1, so ``alpha`` is the norm of what is added;
    without it, the vector is what the features add to the model's activation at strength 1 (for a
    ``constant_scale`` SAE its decoder rows divided by ``input_scale``; an SAE that normalises each
    token has no such fixed vector, and is refused).
    """
    if not features:
        raise ValueError("Name at least one SAE feature whose decoder direction to add")
    out_of_range = [feature for feature in features if not 0 <= feature < sae.d_sae]
    if out_of_range:
        raise ValueError(f"SAE features {out_of_range} do not exist: the SAE at {sae.hook_name} has {sae.d_sae} features (0 to {sae.d_sae - 1})")
    where = sae_point(sae.hook_name)
    width = unwrap_model(model).config.hidden_size
    if sae.d_in != width:
        raise ValueError(
            f"The SAE at {sae.hook_name} reads {sae.d_in} channels, but this model's hidden_size is {width}: it was trained for another model"
        )
    direction = sae.W_dec.detach().float()[list(features)].sum(0)
    if not unit and sae.normalization not in ("none", "constant_scale"):
        raise ValueError(f"The SAE at {sae.hook_name} normalises each token ({sae.normalization}), so its directions have no fixed size: use unit")
    if not unit and sae.normalization == "constant_scale":
        direction = direction / sae.input_scale
    if unit:
        norm = direction.norm()
        if norm == 0:
            raise ValueError(f"The decoder direction of features {list(features)} of the SAE at {sae.hook_name} is zero")
        direction = direction / norm
    provenance: dict[str, Any] = {"source": "sae", "sae": sae.source or sae.hook_name, "features": list(features), "unit": unit}
    vectors = SteeringVectors.for_model(model, [SAE_POINTS[where.point]], [where.layer], provenance=provenance)
    (name,) = vectors.sites
    vectors.set_vector(name, direction)
    return vectors
