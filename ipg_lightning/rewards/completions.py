"""From sampled trajectories to scored completions: the adapter between sampling and rewards.

Attribution, learned steering and evaluation all turn :class:`~ipg_lightning.rollout.trajectories.Trajectories`
into :class:`~ipg_lightning.rewards.functions.Completion` records and, for the policy gradient, into a
(prompts x N) reward matrix; this module is the one place that does it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ipg_lightning.rewards.functions import Completion, Reward, score_completions
from ipg_lightning.rollout.trajectories import Trajectories


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    """A function that counts the tokens of a text the way ``tokenizer`` encodes it (no specials)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def completions_of(
    trajectories: Trajectories, prompts: Sequence[str], golds: Sequence[str | None], tokenizer: PreTrainedTokenizerBase
) -> list[Completion]:
    """Turn sampled trajectories into :class:`~ipg_lightning.rewards.functions.Completion` records for rewards."""
    count = token_counter(tokenizer)
    return [
        Completion(
            prompt=prompts[trajectories.prompt_index[row]],
            text=trajectories.completions[row],
            num_tokens=len(trajectories.completion_ids[row]),
            gold=golds[trajectories.prompt_index[row]],
            count_tokens=count,
        )
        for row in range(len(trajectories))
    ]


def reward_matrix(
    reward: Reward, trajectories: Trajectories, prompts: Sequence[str], golds: Sequence[str | None], tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """The rewards of ``trajectories`` as a float64 (prompts x N) matrix, N samples per prompt in order."""
    values = score_completions(reward, completions_of(trajectories, prompts, golds, tokenizer))
    return torch.tensor(values, dtype=torch.float64).view(len(prompts), -1)


def sides_of_the_mean(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrast within each prompt's N samples, for a (prompts x N) reward matrix.

    Returns the flat (prompts * N) masks of the trajectories above and below their prompt's mean
    reward, and the (prompts,) mask of prompts whose rewards differ; a prompt whose N rewards are all
    equal puts no trajectory on either side. For accuracy that is correct against incorrect answers
    to the same question, for reasoning length long against short ones.
    """
    has_signal = rewards.amax(1, keepdim=True) > rewards.amin(1, keepdim=True)
    group_mean = rewards.mean(1, keepdim=True)
    above = ((rewards > group_mean) & has_signal).flatten()
    below = ((rewards < group_mean) & has_signal).flatten()
    return above, below, has_signal.flatten()
