"""lm-evaluation-harness on steered models: lm-eval's HF model with the gates attached.

:class:`SteeredHFLM` is lm-eval's own ``HFLM`` whose forward (log-likelihood tasks) and ``generate``
(generation tasks) run with the model's gates attached, so any lm-eval task scores a base, gated
(fixed or learned, any family, residual and SAE sites included) or exported model.
:func:`run_lm_eval` runs tasks through ``lm_eval.simple_evaluate`` and adds the reasoning length of
every generated answer, measured as the library measures it.

lm-eval is an optional dependency: ``pip install "ipg-lightning[lm-eval]"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.interventions import attached
from ipg_lightning.rewards.completions import token_counter
from ipg_lightning.rewards.functions import Completion, reasoning_length
from ipg_lightning.vectors import SteeringVectors

INSTALL_HINT = 'pip install "ipg-lightning[lm-eval]"'

try:
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as error:  # an optional dependency: say how to get it
    raise ModuleNotFoundError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from error


class SteeredHFLM(HFLM):
    """lm-eval's ``HFLM`` around an in-memory model whose forward and ``generate`` run with ``gates``
    and then ``vectors`` attached (None: the model as it is).

    Args:
        model: the Hugging Face model (plain, exported or PEFT-wrapped).
        tokenizer: its tokenizer.
        gates: the gates that steer it, attached only while lm-eval calls the model.
        vectors: steering vectors added after the gates, likewise.
        **kwargs: ``HFLM`` settings (``batch_size``, ``max_length``, ``think_end_token``...).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        gates: ComponentGates | None = None,
        vectors: SteeringVectors | None = None,
        **kwargs: Any,
    ) -> None:
        with _quiet_lm_eval():
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.gates, self.vectors = gates, vectors

    def _steered(self) -> AbstractContextManager:
        return attached(self.model, self.gates, self.vectors)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        with self._steered():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        with self._steered():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns at length that a model object (not a name) was passed; that is the point here."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def generated_lengths(samples: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, float] | None:
    """Mean completion tokens and reasoning length (tokens before ``</think>`` or the final-answer
    marker) of a generation task's logged samples (every repeat; each document once, though lm-eval
    logs it once per filter); None for a task that generates nothing."""
    count = token_counter(tokenizer)
    first_filter = next((sample.get("filter") for sample in samples), None)
    texts = [
        text
        for sample in samples
        if sample.get("filter") == first_filter
        for response in sample.get("resps", [])
        for text in (response if isinstance(response, list) else [response])
        if isinstance(text, str)
    ]
    if not texts:
        return None
    completions = [Completion(prompt="", text=text, num_tokens=count(text), count_tokens=count) for text in texts]
    return {
        "completion_tokens_mean": sum(c.num_tokens for c in completions) / len(completions),
        "reasoning_length_mean": sum(reasoning_length(c) for c in completions) / len(completions),
        "generations": len(completions),
    }


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> Any:
    """lm-eval's task index (with ``include_path``'s tasks), built once per folder: indexing every
    task takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_lm_eval(
    lm: Any,
    tasks: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    include_path: str | None = None,
    measure_reasoning: bool = True,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``lm`` (an lm-eval model) with ``simple_evaluate``.

    Returns lm-eval's results (``results``, ``versions``, ``n-shot``, ``configs``...), its logged
    ``samples`` per task, and ``reasoning`` per generation task (:func:`generated_lengths`; left
    out with ``measure_reasoning`` False: a model given lm-eval's ``think_end_token`` logs its
    answers without the reasoning).
    ``include_path`` adds a folder of task YAMLs (local tasks); ``evaluate_kwargs`` go to
    ``simple_evaluate`` (``num_fewshot``, ``limit``, ``apply_chat_template``, ``gen_kwargs``...).
    """
    from lm_eval import simple_evaluate

    manager = _task_manager(include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"lm-eval has no task {unknown}; `lm-eval ls tasks` lists them, and --include_path adds a folder of task YAMLs")
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True, **evaluate_kwargs)
    samples = results.pop("samples", {})
    lengths = {task: generated_lengths(task_samples, tokenizer) for task, task_samples in samples.items()} if measure_reasoning else {}
    results["reasoning"] = {task: value for task, value in lengths.items() if value is not None}
    return {**results, "samples": samples}
