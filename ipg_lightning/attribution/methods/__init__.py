"""Attribution methods, one class each; :data:`METHODS` maps their names to them.

Adding a method means adding a subclass of :class:`AttributionMethod` and listing it here; the
command line's choices (:data:`AttributionMethodName`) follow from this list.
"""

from typing import Literal

from ipg_lightning.attribution.methods.activation import MeanActivation, MeanDifference
from ipg_lightning.attribution.methods.base import AttributionMethod, MethodSettings
from ipg_lightning.attribution.methods.ipg import GradientTimesActivation, IntegratedPolicyGradient
from ipg_lightning.attribution.methods.random import RandomScores
from ipg_lightning.attribution.methods.reference import ReferenceIntegratedGradients

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
    "methods_that",
]
