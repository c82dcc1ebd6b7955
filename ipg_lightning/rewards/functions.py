"""Outcome rewards (signals): map a finished trajectory to a number.

A reward is any callable ``reward(completion: Completion) -> float``. Built in: :func:`accuracy`,
:func:`reasoning_length`, :func:`answer_present`, weighted sums with :class:`CompoundReward`, and
any user function named by import path (``my_pkg.rewards:politeness``) through :func:`load_reward`.

>>> completion = Completion(prompt="2+3?", text="2 + 3 = 5\\n#### 5", num_tokens=9, gold="5")
>>> accuracy(completion), answer_present(completion)
(1.0, 1.0)
>>> reasoning_length(completion)  # 5 words before "####" (no tokenizer given)
5.0
>>> CompoundReward({"accuracy": 1.0, "reasoning_length": -0.1})(completion)
0.5
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ipg_lightning.rewards.answers import THINK_END, extract_answer, is_correct


@dataclass(frozen=True)
class Completion:
    """One finished trajectory, as rewards see it.

    Args:
        prompt: the prompt text the model saw.
        text: the decoded completion.
        num_tokens: number of generated tokens.
        gold: the reference final answer, if known.
        count_tokens: turns a prefix of ``text`` into a token count (the tokenizer's); used to
            measure reasoning that ends before the completion does. Defaults to whitespace words.
    """

    prompt: str
    text: str
    num_tokens: int
    gold: str | None = None
    count_tokens: Callable[[str], int] | None = field(default=None, repr=False, compare=False)

    def tokens_in(self, prefix: str) -> int:
        """Token count of ``prefix`` (a prefix of ``text``), capped at :attr:`num_tokens`."""
        counted = self.count_tokens(prefix) if self.count_tokens else len(prefix.split())
        return min(counted, self.num_tokens)


class Reward(Protocol):
    """What a reward is: a callable from a :class:`Completion` to a float."""

    def __call__(self, completion: Completion) -> float: ...


def accuracy(completion: Completion) -> float:
    """1.0 if the completion's final answer matches the gold answer (:func:`~ipg_lightning.rewards.answers.is_correct`), else 0.0."""
    if completion.gold is None:
        raise ValueError("The accuracy reward needs a gold answer; this example has none")
    return float(is_correct(completion.text, completion.gold))


def answer_present(completion: Completion) -> float:
    """1.0 if a final answer can be extracted from the completion, else 0.0."""
    return float(extract_answer(completion.text) is not None)


def reasoning_span_end(text: str) -> int:
    """Character index where the reasoning ends: at ``</think>`` when present, else at an explicit
    final-answer marker (``####``, ``The answer is``, ``\\boxed``), else at the end of the text."""
    think_end = text.find(THINK_END)
    if think_end >= 0:
        return think_end
    found = extract_answer(text)
    if found is not None and found.method != "last_number":
        return found.start
    return len(text)


def reasoning_length(completion: Completion) -> float:
    """Number of reasoning tokens: before ``</think>``, else before the final-answer marker, else all."""
    end = reasoning_span_end(completion.text)
    if end >= len(completion.text):
        return float(completion.num_tokens)
    return float(completion.tokens_in(completion.text[:end]))


BUILTIN_REWARDS: dict[str, Reward] = {
    "accuracy": accuracy,
    "answer_present": answer_present,
    "reasoning_length": reasoning_length,
}


class CompoundReward:
    """A weighted sum of rewards, e.g. ``{"accuracy": 1.0, "reasoning_length": -0.001}``.

    Keys are built-in reward names or import paths (see :func:`load_reward`).
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("CompoundReward needs at least one weighted reward")
        self.weights = dict(weights)
        self.parts = {name: load_reward(name) for name in self.weights}

    def __call__(self, completion: Completion) -> float:
        return sum(weight * self.parts[name](completion) for name, weight in self.weights.items())


def load_reward(spec: str | Mapping[str, float] | Reward) -> Reward:
    """Resolve a reward from config: a built-in name, ``"package.module:function"``, a mapping of
    weights (a :class:`CompoundReward`), or a callable (returned as is)."""
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        return CompoundReward(spec)
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    reward_import_paths(spec)  # a name that is neither built in nor an import path raises
    module_name, _, attribute = spec.partition(":")
    try:
        reward = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import reward {spec!r}: {error}") from None
    if not callable(reward):
        raise ValueError(f"Reward {spec!r} is not callable")
    return reward


def reward_record(spec: str | Mapping[str, float] | Reward) -> str | dict[str, float]:
    """How a report names a reward setting: a name or weights as given, a :class:`CompoundReward` by its
    weights, any other callable by where it is defined (``module:qualified_name``).

    >>> reward_record(CompoundReward({"accuracy": 1.0})), reward_record(accuracy)
    ({'accuracy': 1.0}, 'ipg_lightning.rewards.functions:accuracy')
    """
    if isinstance(spec, CompoundReward):
        return dict(spec.weights)
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return dict(spec)
    return f"{spec.__module__}:{getattr(spec, '__qualname__', type(spec).__qualname__)}"


#: The names the built-in :func:`reasoning_length` goes by in a reward setting.
REASONING_LENGTH_NAMES = ("reasoning_length", "ipg_lightning.rewards:reasoning_length", "ipg_lightning.rewards.functions:reasoning_length")


def names_reasoning_length(spec: str | Mapping[str, float] | Reward) -> bool:
    """Whether a reward setting includes the built-in :func:`reasoning_length` (with a non-zero weight, where weighted).

    It counts by name (:data:`REASONING_LENGTH_NAMES`), as the function itself, and inside a mapping
    of weights or a :class:`CompoundReward`. Other import paths and callables are not looked into
    (their code is the user's), so they count as not including it.

    >>> names_reasoning_length({"accuracy": 1.0, "reasoning_length": -0.01}), names_reasoning_length("accuracy")
    (True, False)
    """
    if isinstance(spec, CompoundReward):
        spec = spec.weights
    if isinstance(spec, Mapping):
        return any(weight and names_reasoning_length(name) for name, weight in spec.items())
    return spec is reasoning_length or (isinstance(spec, str) and spec in REASONING_LENGTH_NAMES)


def reward_import_paths(spec: str | Mapping[str, float] | Reward) -> list[str]:
    """The import paths a reward setting names, without importing them (importing runs their code).

    Built-in names and callables name none; a name that is neither built in nor ``module:function``
    raises, so a typo is caught before any work starts.

    >>> reward_import_paths({"accuracy": 1.0, "my_rewards:politeness": 0.1})
    ['my_rewards:politeness']
    """
    if callable(spec):
        return []
    names = list(spec) if isinstance(spec, Mapping) else [spec]
    for name in names:
        if name not in BUILTIN_REWARDS and ":" not in str(name):
            raise ValueError(
                f"Unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)}, a mapping of weights, "
                "or an import path like 'my_package.rewards:my_reward'"
            )
    return [str(name) for name in names if name not in BUILTIN_REWARDS]


class DeferredReward:
    """A reward setting whose import paths are imported on first use, and only while that is allowed.

    Names are checked at once (:func:`reward_import_paths`); the code an import path names runs only
    when :meth:`get` is first called with ``import_allowed`` true.

    Args:
        spec: a built-in name, an import path, a mapping of weights, or a callable.
    """

    def __init__(self, spec: str | Mapping[str, float] | Reward) -> None:
        self.import_paths = reward_import_paths(spec)
        self.spec = spec
        self.import_allowed = True
        self._reward: Reward | None = None

    def get(self) -> Reward:
        """The reward, imported on first use; ``PermissionError`` if it names code and importing is not allowed."""
        if self._reward is None:
            if self.import_paths and not self.import_allowed:
                raise PermissionError(
                    f"This module was rebuilt from a checkpoint whose reward imports {self.import_paths}, which runs that code; "
                    "pass trust_reward=True to load_steering_checkpoint if you trust the checkpoint"
                )
            self._reward = load_reward(self.spec)
        return self._reward


def score_completions(reward: Reward, completions: Sequence[Completion]) -> list[float]:
    """Apply ``reward`` to each completion, checking that every result is a finite number."""
    scores = []
    name = getattr(reward, "__name__", None) or type(reward).__name__
    for index, completion in enumerate(completions):
        returned = reward(completion)
        try:
            if isinstance(returned, str | bytes):  # float("0.5") would pass
                raise TypeError
            value = float(returned)
        except (TypeError, ValueError):
            shown = repr(returned) if len(repr(returned)) <= 40 else repr(returned)[:40] + "..."
            raise ValueError(
                f"The reward {name} returned {shown} ({type(returned).__name__}) for completion {index}: rewards must be numbers"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"The reward {name} returned {value} for completion {index}: rewards must be finite")
        scores.append(value)
    return scores
