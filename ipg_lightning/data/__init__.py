"""Reasoning data: examples, sources, prompt templates, the built-in task and the DataModule."""

from ipg_lightning.data.batch import ReasoningBatch, batch_subset, require_solutions
from ipg_lightning.data.datamodule import ReasoningDataModule
from ipg_lightning.data.examples import BadRowError, ColumnSpec, ReasoningExample
from ipg_lightning.data.prompts import PromptTemplate
from ipg_lightning.data.sources import DataSourceError
from ipg_lightning.data.synthetic import ArithmeticChainTask

__all__ = [
    "ArithmeticChainTask",
    "BadRowError",
    "ColumnSpec",
    "DataSourceError",
    "PromptTemplate",
    "ReasoningBatch",
    "ReasoningDataModule",
    "ReasoningExample",
    "batch_subset",
    "require_solutions",
]
