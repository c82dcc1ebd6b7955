"""The base of the library's LightningModules: a causal LM, its tokenizer, and the data they read.

In the spirit of torchgeo's ``BaseTask``: a task loads its model by path (or is handed one already
loaded, :meth:`ReasoningTask.for_model`), freezes it, and hands the tokenizer to the data module
in ``setup``. Subclasses add what they attach to the model in :meth:`configure_components` (gates,
adapters) and their own steps.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import lightning as L
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import IN_MEMORY_MODEL
from ipg_lightning.model.loading import load_model_and_tokenizer, model_directory


def plain(value: Any) -> Any:
    """A dataclass (or a dict of them) as plain dicts, for hyperparameters and JSON metadata."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def model_name(model: nn.Module) -> str:
    """How a loaded model is named in reports and checkpoints: its source path, else ``in-memory model``."""
    return getattr(getattr(model, "config", None), "_name_or_path", "") or IN_MEMORY_MODEL


class ReasoningTask(L.LightningModule):
    """A LightningModule over a causal LM (frozen unless a subclass trains it) and its tokenizer.

    Args:
        model_path: local Hugging Face model directory, or an alias (``tiny:<family>`` for the
            tests' tiny model, ``smollm2``); None for a task that builds its own model.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``, ``auto``).
        architecture: module paths for a decoder that is not built in.
    """

    #: Constructor arguments that are not hyperparameters (see :meth:`save_plain_hyperparameters`).
    hparams_ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model_path: str | None, dtype: str = "float32", architecture: ArchitectureSpec | dict | None = None) -> None:
        super().__init__()
        self.model_path = model_directory(model_path) if model_path else model_path  # the directory a shipped name stands for
        self.weights_dtype = dtype
        self.architecture = ArchitectureSpec(**architecture) if isinstance(architecture, dict) else architecture
        self.lm: nn.Module | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> ReasoningTask:
        """The task over an already loaded model (Python API) instead of one loaded by path.

        Reports and checkpoints name the model by its source path (``config._name_or_path``), or by
        ``model_path`` if given (e.g. the alias it can be loaded again with), else ``in-memory model``.
        """
        kwargs.setdefault("model_path", model_name(model))
        module = cls(**kwargs)
        module.attach_model(model, tokenizer)
        return module

    def attach_model(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, freeze: bool = True) -> None:
        """Take ``model`` (in eval mode, its own parameters frozen unless ``freeze`` is False) and configure it."""
        if freeze:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
        self.lm, self.tokenizer = model.eval(), tokenizer
        self.configure_components()

    def configure_components(self) -> None:
        """Template hook: attach what the task needs to the model (gates, adapters); runs once per model."""

    def load_model(self) -> None:
        """Load the model named by ``model_path``, unless one is attached already."""
        if self.lm is None:
            self.attach_model(*load_model_and_tokenizer(self.model_path, self.weights_dtype))

    def setup(self, stage: str) -> None:
        """Load the model (once), and hand its tokenizer to the data module."""
        self.load_model()
        self.connect_data()

    def connect_data(self) -> None:
        """Give the Trainer's data module the tokenizer (``datamodule.connect``), if there is one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.tokenizer)

    def save_plain_hyperparameters(self) -> None:
        """Save the arguments of the constructor that calls this as hyperparameters, each a plain value.

        The one hyperparameter policy of every task: dataclasses become dicts, so checkpoints load with
        ``torch.load(weights_only=True)`` (which refuses pickled classes) and reports record the settings as
        JSON. A reward given as a Python callable (rather than a name or weights) cannot be saved and is
        left out, as is every argument named in :attr:`hparams_ignore`.
        """
        frame = inspect.currentframe().f_back
        arguments = inspect.getargvalues(frame)
        values = {name: arguments.locals[name] for name in arguments.args[1:] if name not in self.hparams_ignore}
        if "reward" in values and not isinstance(values["reward"], str | dict):
            del values["reward"]
        self.save_hyperparameters({name: plain(value) for name, value in values.items()})

    def plain_hparams(self) -> dict[str, Any]:
        """The hyperparameters without the private entries LightningCLI adds."""
        return {key: value for key, value in self.hparams.items() if not key.startswith("_")}
