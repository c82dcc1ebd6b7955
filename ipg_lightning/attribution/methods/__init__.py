"""Attribution methods, one class each; :data:`METHODS` maps their names to them.

Adding a method means adding a subclass of :class:`AttributionMethod` and listing it here (and in
:data:`AttributionMethodName`, which the command line validates against).
"""

from typing import Literal

from ipg_lightning.attribution.methods.activation import MeanActivation, MeanDifference
from ipg_lightning.attribution.methods.base import AttributionMethod
from ipg_lightning.attribution.methods.ipg import GradientTimesActivation, IntegratedPolicyGradient
from ipg_lightning.attribution.methods.random import RandomScores
from ipg_lightning.attribution.methods.reference import ReferenceIntegratedGradients

AttributionMethodName = Literal["ipg", "grad_x_act", "random", "activation", "mean_diff", "ig_reference"]

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

__all__ = [
    "METHODS",
    "AttributionMethod",
    "AttributionMethodName",
    "GradientTimesActivation",
    "IntegratedPolicyGradient",
    "MeanActivation",
    "MeanDifference",
    "RandomScores",
    "ReferenceIntegratedGradients",
]
