"""Outcome rewards: grading answers the way the field does, and turning completions into numbers.

- :mod:`~ipg_lightning.rewards.answers`: extracting and matching final answers;
- :mod:`~ipg_lightning.rewards.functions`: the built-in rewards, :class:`CompoundReward`, :func:`load_reward`;
- :mod:`~ipg_lightning.rewards.completions`: completions of trajectories, scored.

Rewards are named in recipes as ``ipg_lightning.rewards:accuracy``.
"""

from ipg_lightning.rewards.functions import (
    Completion,
    CompoundReward,
    Reward,
    accuracy,
    answer_present,
    load_reward,
    reasoning_length,
)

__all__ = ["Completion", "CompoundReward", "Reward", "accuracy", "answer_present", "load_reward", "reasoning_length"]
