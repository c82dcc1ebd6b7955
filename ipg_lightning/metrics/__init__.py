"""Reasoning metrics: torchmetrics classes over a pure functional core (``functional``)."""

from ipg_lightning.metrics.reasoning import AnswerRate, PassAtK, ReasoningAccuracy, ReasoningLength, ReasoningMetrics, ReflectionRate

__all__ = ["AnswerRate", "PassAtK", "ReasoningAccuracy", "ReasoningLength", "ReasoningMetrics", "ReflectionRate"]
