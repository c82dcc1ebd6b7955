"""Attribution methods, one class each; :data:`METHODS` maps their names to them.

Adding a method means adding a subclass of :class:`AttributionMethod` and listing it here; the
command line's choices (:data:`AttributionMethodName`) follow from this list.
"""

from collections.abc import Mapping
from typing import Literal

from ipg_lightning.attribution.estimator import SURROGATES
from ipg_lightning.attribution.methods.activation import MeanActivation, MeanDifference
from ipg_lightning.attribution.methods.base import AttributionMethod, MethodSettings
from ipg_lightning.attribution.methods.ipg import GradientTimesActivation, IntegratedPolicyGradient
from ipg_lightning.attribution.methods.random import RandomScores
from ipg_lightning.attribution.methods.reference import ReferenceIntegratedGradients
from ipg_lightning.checks import check_sampling_has_signal
from ipg_lightning.rewards.functions import Reward, names_reasoning_length
from ipg_lightning.rollout.trajectories import SamplingConfig

#: Every attribution method by name.
METHODS: dict[str, type[AttributionMethod]] = {
    method.name: method
    for method in (
        IntegratedPolicyGradient,
        GradientTimesActivation,
        RandomScores,
        MeanActivation,
        MeanDifference,
        ReferenceIntegratedGradients,
    )
}

#: The method names, as the type the command line validates against.
AttributionMethodName = Literal[tuple(METHODS)]  # noqa: UP007 (built from the registry)


def check_method(method: str, settings: MethodSettings, sampling: SamplingConfig, keep_trajectories: bool = False) -> None:
    """Refuse, in one line, a method that cannot run with these settings (what it needs follows from its capabilities)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)}")
    if settings.signal_retries and (not METHODS[method].retries_signal or settings.estimation != "fixed"):
        retrying = " or ".join(methods_that("retries_signal"))
        raise ValueError(f"signal_retries applies to method {retrying} with estimation fixed, not {method!r} with {settings.estimation!r}")
    if settings.surrogate != "sum" and (not METHODS[method].weighs_surrogate or settings.estimation != "fixed"):
        weighing = " or ".join(methods_that("weighs_surrogate"))
        raise ValueError(
            f"surrogate {settings.surrogate} applies to method {weighing} with estimation fixed, not {method!r} with {settings.estimation!r}"
        )
    if settings.surrogate == "token_mean" and settings.advantage == "none":
        raise ValueError("surrogate token_mean needs advantages that sum to zero within each prompt; use advantage rloo or grpo, not none")
    if keep_trajectories and not METHODS[method].samples:
        raise ValueError(f"keep_trajectories: method {method!r} samples no trajectories to keep; use {', '.join(methods_that('samples'))}")
    if METHODS[method].needs_reward_signal:
        check_sampling_has_signal(sampling.num_samples, sampling.temperature, f"method {method!r}")


#: The share of support prompts without signal from which an attribution suggests ``signal_retries``.
SCARCE_SIGNAL_SHARE = 0.25


def scarce_signal_advice(method: str, settings: MethodSettings, prompts: int, zero_signal_prompts: int | None, num_samples: int) -> str | None:
    """What to do when at least :data:`SCARCE_SIGNAL_SHARE` of the support prompts carried no signal, else None.

    A prompt whose N rewards are all equal has zero advantages and adds nothing to the scores. Only
    said where ``signal_retries`` could redraw such groups and is off.

    >>> scarce_signal_advice("ipg", MethodSettings(), prompts=8, zero_signal_prompts=4, num_samples=4)[:62]
    '4 of 8 support prompts carried no signal (all 4 rewards equal)'
    >>> scarce_signal_advice("ipg", MethodSettings(signal_retries=4), prompts=8, zero_signal_prompts=4, num_samples=4) is None
    True
    """
    retrying = method in METHODS and METHODS[method].retries_signal and settings.estimation == "fixed"
    if not retrying or settings.signal_retries or not zero_signal_prompts or zero_signal_prompts < SCARCE_SIGNAL_SHARE * prompts:
        return None
    return (
        f"{zero_signal_prompts} of {prompts} support prompts carried no signal (all {num_samples} rewards equal) and add nothing to the scores; "
        "signal_retries: 4 redraws such groups (which reweights prompts: docs/method.md, section 3), or use problems the model solves sometimes"
    )


def resolve_surrogate(choice: str, method: str, estimation: str, advantage: str, reward: str | Mapping[str, float] | Reward) -> str:
    """The surrogate a ``surrogate`` setting stands for; ``auto`` chooses from the reward and the method.

    ``auto`` is ``token_mean`` where that applies (a method that weighs the surrogate, fixed
    estimation, advantages that sum to zero within a prompt) and the reward includes the built-in
    ``reasoning_length`` (:func:`~ipg_lightning.rewards.functions.names_reasoning_length`);
    otherwise ``sum``. On length rewards the summed surrogate scores components that merely damage
    the model as lengthening (on SmolLM2 it picked neurons whose removal lengthens traces), and on
    accuracy the two are indistinguishable on every testbed measured (``benchmarks/RESULTS.md``).
    A reward of the user's own (an import path, a function) is not looked into: set ``token_mean``
    yourself if it depends on length.

    >>> resolve_surrogate("auto", "ipg", "fixed", "rloo", {"accuracy": 1.0, "reasoning_length": -0.01})
    'token_mean'
    >>> resolve_surrogate("auto", "ipg", "resample", "rloo", "reasoning_length"), resolve_surrogate("auto", "ipg", "fixed", "rloo", "accuracy")
    ('sum', 'sum')
    """
    if choice not in ("auto", *SURROGATES):
        raise ValueError(f"Unknown surrogate {choice!r}; choose from {['auto', *SURROGATES]}")
    if choice != "auto":
        return choice
    method_weighs = method in METHODS and METHODS[method].weighs_surrogate
    applies = method_weighs and estimation == "fixed" and advantage != "none"
    return "token_mean" if applies and names_reasoning_length(reward) else "sum"


def methods_that(capability: str) -> list[str]:
    """The names of the methods with a capability (a class attribute of :class:`AttributionMethod`, e.g. ``samples``).

    >>> methods_that("splits_per_token")
    ['ipg', 'grad_x_act']
    """
    return [name for name, method in METHODS.items() if getattr(method, capability)]


__all__ = [
    "METHODS",
    "AttributionMethod",
    "AttributionMethodName",
    "GradientTimesActivation",
    "IntegratedPolicyGradient",
    "MeanActivation",
    "MeanDifference",
    "MethodSettings",
    "RandomScores",
    "ReferenceIntegratedGradients",
    "check_method",
    "methods_that",
    "resolve_surrogate",
    "scarce_signal_advice",
]
