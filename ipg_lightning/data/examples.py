"""Reasoning examples and the row formats they are parsed from (GSM8K, MATH, named columns)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ipg_lightning.rewards.answers import boxed_spans, normalize_answer, parse_number
from ipg_lightning.rollout.seeds import prompt_seed

RowFormat = Literal["auto", "gsm8k", "math", "columns"]


class BadRowError(ValueError):
    """A data row that cannot become a :class:`ReasoningExample`; the message names source and row."""


@dataclass(frozen=True)
class ReasoningExample:
    """One reasoning problem.

    Args:
        id: stable identifier (source-specific, e.g. ``test-17``).
        question: the problem statement, without any prompt template.
        answer: the normalised gold final answer.
        solution: a reference reasoning trace ending in the answer, if the source has one.
        seed: the example's own sampling seed, so its trajectories never depend on batching.
    """

    id: str
    question: str
    answer: str
    solution: str | None
    seed: int


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold what, for ``format="columns"`` (and the defaults of the other formats).

    Args:
        question: column with the problem text.
        answer: column with the gold final answer.
        solution: optional column with a reference solution (rows without one get ``None``).
    """

    question: str = "question"
    answer: str = "answer"
    solution: str | None = None


def detect_format(columns: Iterable[str], first_row: Mapping[str, Any]) -> RowFormat:
    """Guess the row format from column names: MATH (problem/solution), GSM8K (``####`` answers),
    or generic columns."""
    columns = set(columns)
    if {"problem", "solution"} <= columns:
        return "math"
    if {"question", "answer"} <= columns and "####" in str(first_row.get("answer", "")):
        return "gsm8k"
    return "columns"


def _text_field(row: Mapping[str, Any], field: str, where: str) -> str:
    if field not in row or row[field] is None:
        raise BadRowError(f"{where}: missing field {field!r} (row has {sorted(row)})")
    value = str(row[field]).strip()
    if not value:
        raise BadRowError(f"{where}: field {field!r} is empty")
    return value


def parse_row(row: Mapping[str, Any], row_format: RowFormat, columns: ColumnSpec, where: str, seed: int) -> ReasoningExample:
    """Turn one raw row into a :class:`ReasoningExample`, or raise :class:`BadRowError` naming ``where``."""
    if row_format == "gsm8k":
        question = _text_field(row, "question", where)
        solution = _text_field(row, "answer", where)
        if "####" not in solution:
            raise BadRowError(f"{where}: GSM8K answer has no '#### <answer>' line: {solution[-80:]!r}")
        gold = solution.rsplit("####", 1)[1].strip()
    elif row_format == "math":
        question = _text_field(row, "problem", where)
        solution = _text_field(row, "solution", where)
        boxed = boxed_spans(solution)
        if not boxed:
            raise BadRowError(f"{where}: MATH solution has no \\boxed{{...}} answer")
        gold = boxed[-1][1]
    else:
        question = _text_field(row, columns.question, where)
        gold = _text_field(row, columns.answer, where)
        solution = str(row.get(columns.solution) or "").strip() or None if columns.solution else None
    gold = normalize_answer(gold)
    if not gold:
        raise BadRowError(f"{where}: gold answer is empty after normalisation")
    if row_format != "math" and parse_number(gold) is None:
        raise BadRowError(f"{where}: gold answer {gold!r} is not a number")
    row_id = str(row.get("id", where))
    return ReasoningExample(id=row_id, question=question, answer=gold, solution=solution, seed=seed)


def parse_rows(
    rows: Sequence[Mapping[str, Any]],
    row_format: RowFormat,
    columns: ColumnSpec,
    label: str,
    id_prefix: str,
    seed: int,
    skip_bad_rows: bool = False,
) -> tuple[list[ReasoningExample], int]:
    """Parse ``rows`` (of ``row_format``, or detected from the first row with ``auto``) into examples
    with ids ``<id_prefix>-<index>`` (unless a row has its own), each with its own sampling seed drawn
    from ``seed`` and its id.

    Returns the examples and how many bad rows were skipped; with ``skip_bad_rows`` False the first
    bad row raises :class:`BadRowError`, naming ``label`` and the row."""
    if not rows:
        return [], 0
    if row_format == "auto":
        row_format = detect_format(rows[0].keys(), rows[0])
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        row = {"id": f"{id_prefix}-{index}", **row}
        try:
            examples.append(parse_row(row, row_format, columns, f"{label} row {index}", prompt_seed(f"{seed}:{row['id']}")))
        except BadRowError:
            if not skip_bad_rows:
                raise
            skipped += 1
    return examples, skipped
