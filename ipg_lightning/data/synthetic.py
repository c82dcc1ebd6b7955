"""A built-in, seeded multi-step arithmetic task with chain-of-thought solutions.

A problem applies a chain of operations to a starting number; the solution writes one line per
step and ends with a GSM8K-style ``#### <answer>`` line. Difficulty knobs: the number of steps,
the operand range and the allowed operations. With ``reflection_probability > 0`` some solution
steps are followed by a "Wait, let me check" line that recomputes them, so reasoning length varies.

>>> task = ArithmeticChainTask(min_steps=2, max_steps=2, seed=3)
>>> example = task.example(0)
>>> print(example["question"])
Start with 9. Subtract 2, then subtract 5. What is the result?
>>> print(example["solution"])
9 - 2 = 7
7 - 5 = 2
#### 2
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_OPERATIONS = {
    "+": ("add {x}", lambda a, b: a + b),
    "-": ("subtract {x}", lambda a, b: a - b),
    "*": ("multiply by {x}", lambda a, b: a * b),
}


@dataclass(frozen=True)
class ArithmeticChainTask:
    """Seeded generator of multi-step arithmetic problems.

    Args:
        min_steps: fewest operations in a problem.
        max_steps: most operations in a problem.
        max_operand: operands and the start value are drawn from 1..max_operand.
        operations: which of ``+``, ``-``, ``*`` may appear.
        reflection_probability: chance that a solution step is followed by a re-check line.
        seed: generator seed; example ``i`` depends only on ``(seed, i)``.
    """

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9
    operations: tuple[str, ...] = ("+", "-", "*")
    reflection_probability: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"Need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        unknown = set(self.operations) - set(_OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {sorted(_OPERATIONS)}, got {self.operations}")
        if not 0 <= self.reflection_probability <= 1:
            raise ValueError(f"reflection_probability must be in [0, 1], got {self.reflection_probability}")
        object.__setattr__(self, "operations", tuple(self.operations))

    def example(self, index: int) -> dict[str, str]:
        """Problem ``index``: a dict with ``question``, ``solution`` and ``answer``."""
        rng = random.Random(f"{self.seed}:{index}")
        value = rng.randint(1, self.max_operand)
        phrases, lines = [], []
        for step in range(rng.randint(self.min_steps, self.max_steps)):
            symbol = rng.choice(self.operations)
            operand = rng.randint(1, self.max_operand)
            template, apply = _OPERATIONS[symbol]
            phrase = template.format(x=operand)
            phrases.append(phrase[0].upper() + phrase[1:] if step == 0 else phrase)
            result = apply(value, operand)
            lines.append(f"{value} {symbol} {operand} = {result}")
            if rng.random() < self.reflection_probability:
                lines.append(f"Wait, let me check: {value} {symbol} {operand} = {result}. Yes.")
            value = result
        start = lines[0].split(" ", 1)[0]
        question = f"Start with {start}. {', then '.join(phrases)}. What is the result?"
        solution = "\n".join(lines + [f"#### {value}"])
        return {"question": question, "solution": solution, "answer": str(value)}
