"""Where steering vectors come from: contrasts of the model's own trajectories, and SAE decoder directions.

A *contrast vector* is the difference of mean activations between two sets of the model's own
sampled trajectories, read over their generated tokens: those above and those below their prompt's
mean reward, within each prompt's N samples (the sides the ``mean_diff`` baseline contrasts;
:func:`~ipg_lightning.rewards.completions.sides_of_the_mean`), taken prompt by prompt and averaged
over the prompts whose samples differ, so that no difference between problems enters it. For
accuracy that is correct minus incorrect answers to the same question; for reasoning length, long
minus short, so a negative ``alpha`` shortens. An *SAE direction* is one feature's decoder row, added where that SAE reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.activations import mean_completion_activations
from ipg_lightning.model.autoencoder import SparseAutoencoder
from ipg_lightning.model.families import SAE_POINTS, ArchitectureSpec, sae_point
from ipg_lightning.model.sites import Site, default_layer, unwrap_model
from ipg_lightning.rewards.completions import reward_matrix, sides_of_the_mean
from ipg_lightning.rewards.functions import Reward, load_reward
from ipg_lightning.rollout.sampling import sample_trajectories, sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.vectors.additive import SteeringVectors


class NoContrastError(ValueError):
    """The sampled trajectories had nothing to contrast (every prompt's rewards were equal)."""


def _whole_activation(site: Site, activation: torch.Tensor) -> torch.Tensor:
    return activation


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
    per_row = mean_completion_activations(model, sites, trajectories, chunk_size, read=_whole_activation)
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
