"""The models and problems the localisation benchmark measures on (``--testbed``).

A testbed is one model with the tasks it is measured on: the first task is its main one (support
and test problems by default); the others are transfer targets, where components selected on one
task are applied to another (``--support-task``, ``--test-task``).

- ``sft``: the shipped tiny reasoner, trained by supervised learning on the reference solutions
  that ``ig_reference`` scores (so that baseline measures its own training objective here);
- ``rl``: the same reasoner after policy-gradient fine-tuning on accuracy with a length penalty
  (``tiny-reasoner-rl``), so its behaviour is no longer the likelihood of references;
- ``smollm2``: SmolLM2-135M-Instruct (``ipg prepare-smollm2``) on reasoning-gym tasks where its greedy
  accuracy lies between 30 and 70 % (the search is ``benchmarks/smollm2_tasks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from smollm2_tasks import CANDIDATES

from ipg_lightning.data import ArithmeticChainTask, ReasoningDataModule
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_RL_PATH, TINY_REASONER_TASK


@dataclass(frozen=True)
class Problems:
    """Where a task's problems come from: the built-in arithmetic task or a reasoning-gym task."""

    source: str = "synthetic"
    synthetic_task: ArithmeticChainTask = TINY_REASONER_TASK
    task_kwargs: dict[str, Any] | None = None

    def data(self, num_test: int, num_val: int, batch_size: int) -> ReasoningDataModule:
        """A data module dealing the first ``num_test`` problems to test and the next ``num_val`` to validation."""
        return ReasoningDataModule(
            source=self.source,
            synthetic_task=self.synthetic_task,
            task_kwargs=self.task_kwargs,
            num_test=num_test,
            num_val=num_val,
            num_train=0,
            batch_size=batch_size,
        )


@dataclass(frozen=True)
class Testbed:
    """A model, its tasks (the first is the main one), and the blocks whose MLP neurons are ranked."""

    model: str
    tasks: dict[str, Problems]
    layer: int
    length_layer: int
    max_new_tokens: int
    description: str = ""


#: The tiny reasoner's tasks: its training distribution, and two disjoint slices of it for transfer
#: (greedy accuracy of the SFT model on 256 problems: add_sub 0.94, products 0.54).
_TINY_TASKS = {
    "arithmetic": Problems(),
    "products": Problems(synthetic_task=replace(TINY_REASONER_TASK, operations=("*",))),
    "add_sub": Problems(synthetic_task=replace(TINY_REASONER_TASK, operations=("+", "-"))),
}

#: SmolLM2-135M-Instruct's tasks: the candidates of benchmarks/smollm2_tasks.py whose greedy accuracy
#: fell in the 30-70 % band (64 problems each: 0.453, 0.656 and 0.359), the closest to 50 % first.
_SMOLLM2_TASKS = {
    name: Problems(f"reasoning_gym:{CANDIDATES[name][0]}", task_kwargs=CANDIDATES[name][1])
    for name in ("add_sub_1digit", "products_1digit", "letter_counting_short")
}

TESTBEDS = {
    "sft": Testbed(TINY_REASONER_PATH, _TINY_TASKS, layer=2, length_layer=3, max_new_tokens=160, description="tiny reasoner (SFT)"),
    "rl": Testbed(TINY_REASONER_RL_PATH, _TINY_TASKS, layer=2, length_layer=3, max_new_tokens=160, description="tiny reasoner (SFT + RL)"),
    "smollm2": Testbed("smollm2", _SMOLLM2_TASKS, layer=22, length_layer=29, max_new_tokens=192, description="SmolLM2-135M-Instruct"),
}
