"""Reasoning examples and the row formats they are parsed from.

The formats of the paper's four benchmarks, plus named columns:

- ``gsm8k``: ``question`` and ``answer``, the answer's last line ``#### <number>``;
- ``math`` (MATH, MATH-500): ``problem`` and ``solution`` with a ``\\boxed{}`` answer, or an
  ``answer`` column (MATH-500 has both; the column wins; with it, ``solution`` is optional). The
  gold answer stays LaTeX as written;
- ``aime``: ``problem`` and an integer ``answer`` from 0 to 999 (``solution`` optional);
- ``gpqa`` (GPQA-Diamond's CSV): ``Question``, ``Correct Answer`` and ``Incorrect Answer 1``-``3``.
  The four choices are shuffled with the example's seed, lettered A-D in the question, and the gold
  answer is the correct choice's letter;
- ``columns``: any columns, named by :class:`ColumnSpec`.

Column names of ``aime`` and ``gpqa`` rows are matched case-insensitively (``Problem``, ``Answer``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ipg_lightning.rewards.answers import boxed_spans, normalize_answer, parse_number
from ipg_lightning.rollout.seeds import prompt_seed

RowFormat = Literal["auto", "gsm8k", "math", "aime", "gpqa", "columns"]
#: The letters of GPQA's four choices, in the order they are shown.
CHOICE_LETTERS = ("A", "B", "C", "D")
_GPQA_CHOICES = ("correct answer", "incorrect answer 1", "incorrect answer 2", "incorrect answer 3")


class BadRowError(ValueError):
    """A data row that cannot become a :class:`ReasoningExample`; the message names source and row."""


@dataclass(frozen=True)
class ReasoningExample:
    """One reasoning problem.

    Args:
        id: stable identifier (source-specific, e.g. ``test-17``).
        question: the problem statement, without any prompt template.
        answer: the gold final answer (numbers normalised, LaTeX kept as written, a letter for
            multiple choice).
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
    """Guess the row format from column names: GPQA (correct/incorrect answers), MATH
    (problem/solution, or problem/answer with a non-integer first answer), AIME (problem/answer,
    the first answer an integer up to 999), GSM8K (``####`` answers), or generic columns."""
    columns = set(columns)
    if set(_GPQA_CHOICES) <= {column.lower() for column in columns}:
        return "gpqa"
    if {"problem", "solution"} <= columns:
        return "math"
    lowered = {column.lower(): column for column in columns}
    if {"problem", "answer"} <= set(lowered):
        return "aime" if _is_aime_answer(first_row.get(lowered["answer"], "")) else "math"
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


def _column(row: Mapping[str, Any], field: str) -> str:
    """The row's name for ``field`` regardless of case (``Problem`` for ``problem``)."""
    return {name.lower(): name for name in row}.get(field, field)


def _optional_text(row: Mapping[str, Any], field: str) -> str | None:
    value = row.get(_column(row, field))
    return None if value is None else str(value).strip() or None  # an answer of 0 is an answer


def _gsm8k_fields(row: Mapping[str, Any], where: str) -> tuple[str, str, str | None]:
    question, solution = _text_field(row, "question", where), _text_field(row, "answer", where)
    if "####" not in solution:
        raise BadRowError(f"{where}: GSM8K answer has no '#### <answer>' line: {solution[-80:]!r}")
    gold = normalize_answer(solution.rsplit("####", 1)[1])
    if parse_number(gold) is None:
        raise BadRowError(f"{where}: gold answer {gold!r} is not a number")
    return question, gold, solution


def _math_fields(row: Mapping[str, Any], where: str) -> tuple[str, str, str | None]:
    question, gold = _text_field(row, "problem", where), _optional_text(row, "answer")
    solution = _text_field(row, "solution", where) if gold is None else _optional_text(row, "solution")
    if gold is None:
        boxed = boxed_spans(solution)
        if not boxed:
            raise BadRowError(f"{where}: MATH solution has no \\boxed{{...}} answer and the row has no 'answer'")
        gold = boxed[-1][1].strip()
    return question, gold, solution


def _is_aime_answer(value: Any) -> bool:
    return str(value).strip().isdigit() and int(str(value).strip()) <= 999


def _aime_fields(row: Mapping[str, Any], where: str) -> tuple[str, str, str | None]:
    question, gold = _text_field(row, _column(row, "problem"), where), _text_field(row, _column(row, "answer"), where)
    if not _is_aime_answer(gold):
        raise BadRowError(f"{where}: an AIME answer is an integer from 0 to 999, got {gold!r}")
    return question, str(int(gold)), _optional_text(row, "solution")


def _gpqa_fields(row: Mapping[str, Any], where: str, seed: int) -> tuple[str, str, str | None]:
    """The question with its four choices shuffled by ``seed`` and lettered A-D, the correct
    choice's letter, and the explanation (when given) ending in that letter."""
    choices = [_text_field(row, _column(row, name), where) for name in _GPQA_CHOICES]
    order = list(range(len(choices)))
    random.Random(seed).shuffle(order)
    letter = CHOICE_LETTERS[order.index(0)]
    lines = "\n".join(f"{CHOICE_LETTERS[i]}) {choices[k]}" for i, k in enumerate(order))
    question = f"{_text_field(row, _column(row, 'question'), where)}\n\n{lines}"
    explanation = _optional_text(row, "explanation")
    return question, letter, f"{explanation}\n\nThe answer is ({letter})." if explanation else None


def _columns_fields(row: Mapping[str, Any], columns: ColumnSpec, where: str) -> tuple[str, str, str | None]:
    question, gold = _text_field(row, columns.question, where), _text_field(row, columns.answer, where)
    solution = str(row.get(columns.solution) or "").strip() or None if columns.solution else None
    return question, gold, solution


def parse_row(row: Mapping[str, Any], row_format: RowFormat, columns: ColumnSpec, where: str, seed: int) -> ReasoningExample:
    """Turn one raw row into a :class:`ReasoningExample`, or raise :class:`BadRowError` naming ``where``.

    Numeric gold answers are normalised (``1,000.0`` -> ``1000``); others are kept as written, for
    :func:`~ipg_lightning.rewards.answers.answers_match` to compare as mathematics."""
    if row_format == "gsm8k":
        question, gold, solution = _gsm8k_fields(row, where)
    elif row_format == "math":
        question, gold, solution = _math_fields(row, where)
    elif row_format == "aime":
        question, gold, solution = _aime_fields(row, where)
    elif row_format == "gpqa":
        question, gold, solution = _gpqa_fields(row, where, seed)
    else:
        question, gold, solution = _columns_fields(row, columns, where)
    if not normalize_answer(gold):
        raise BadRowError(f"{where}: gold answer is empty after normalisation")
    if parse_number(normalize_answer(gold)) is not None:
        gold = normalize_answer(gold)
    return ReasoningExample(id=str(row.get("id", where)), question=question, answer=gold, solution=solution, seed=seed)


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
        if row_format == "aime" and not all(_is_aime_answer(row.get(_column(row, "answer"))) for row in rows):
            row_format = "math"  # problem/answer rows whose answers are not all AIME integers
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
