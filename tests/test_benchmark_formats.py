"""The paper's four benchmark formats, read from the sample files in ``tests/data/benchmarks``."""

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from ipg_lightning.cli import run
from ipg_lightning.data import BadRowError, ReasoningDataModule
from ipg_lightning.data.examples import CHOICE_LETTERS, ColumnSpec, parse_rows
from ipg_lightning.rewards.answers import is_correct

SAMPLES = Path(__file__).parent / "data" / "benchmarks"
FILES = {"gsm8k": "gsm8k.jsonl", "math": "math500.jsonl", "aime": "aime.jsonl", "gpqa": "gpqa_diamond.csv"}


def _examples(row_format: str, seed: int = 0):
    module = ReasoningDataModule(data_files={"test": str(SAMPLES / FILES[row_format])}, row_format=row_format, num_test=None, seed=seed)
    module.setup()
    return module.examples["test"]


def _rows(name: str) -> list[dict]:
    path = SAMPLES / name
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("row_format", sorted(FILES))
def test_each_format_is_detected_from_its_columns(row_format):
    module = ReasoningDataModule(data_files={"test": str(SAMPLES / FILES[row_format])}, num_test=None)
    module.setup()
    expected = _examples(row_format)
    # AIME rows with a solution column read as MATH rows: the same questions and gold answers
    assert [(e.question, e.answer) for e in module.examples["test"]] == [(e.question, e.answer) for e in expected]


@pytest.mark.parametrize("row_format", sorted(FILES))
def test_reference_solutions_grade_as_correct(row_format):
    examples = _examples(row_format)
    assert len(examples) == 6
    for example in examples:
        assert example.solution is not None and is_correct(example.solution, example.answer), example


def test_gold_answers_of_each_format():
    assert [e.answer for e in _examples("gsm8k")] == ["7", "48", "1000", "20", "63", "30"]
    assert [e.answer for e in _examples("math")][:3] == ["0.5", "2\\sqrt{3}", "x^2+2x+1"]  # numbers exact, other LaTeX as written
    assert [e.answer for e in _examples("aime")] == ["401", "24", "820", "986", "9", "24"]


def test_gpqa_choices_are_shuffled_by_seed_and_graded_by_letter():
    rows = _rows(FILES["gpqa"])
    first, again, other = _examples("gpqa", seed=0), _examples("gpqa", seed=0), _examples("gpqa", seed=1)
    assert [e.question for e in first] == [e.question for e in again]
    assert [e.answer for e in first] != [e.answer for e in other]
    for example, row in zip(first, rows, strict=True):
        lines = example.question.splitlines()[-4:]
        assert [line[:3] for line in lines] == [f"{letter}) " for letter in CHOICE_LETTERS]
        shown = {line[0]: line[3:] for line in lines}
        assert shown[example.answer] == row["Correct Answer"]
        assert sorted(shown.values()) == sorted(row[k] for k in row if "Answer" in k)
        assert is_correct(f"It must be {row['Correct Answer']}. The answer is ({example.answer}).", example.answer)
        wrong = next(letter for letter in CHOICE_LETTERS if letter != example.answer)
        assert not is_correct(f"The answer is ({wrong}).", example.answer)
    assert len(Counter(e.answer for e in first)) > 1  # the correct answer is not always in one place


@pytest.mark.parametrize(
    ("row_format", "row", "message"),
    [
        ("aime", {"problem": "p", "answer": "1000"}, "integer from 0 to 999"),
        ("aime", {"problem": "p", "answer": "3/4"}, "integer from 0 to 999"),
        ("gpqa", {"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b", "Incorrect Answer 2": "c"}, "'incorrect answer 3'"),
        ("math", {"problem": "p", "solution": "no box"}, "no \\\\boxed"),
    ],
)
def test_bad_rows_are_named(row_format, row, message):
    with pytest.raises(BadRowError, match=message):
        parse_rows([row], row_format, ColumnSpec(), "sample.jsonl", "test", seed=0)


@pytest.mark.parametrize(
    ("recipe", "sample"),
    [("gsm8k", "gsm8k.jsonl"), ("math500", "math500.jsonl"), ("aime24", "aime.jsonl"), ("gpqa_diamond", "gpqa_diamond.csv")],
)
def test_each_benchmark_recipe_runs_on_its_sample_file(tmp_path, recipe, sample):
    """The GPU recipes, with the tiny reasoner, the HF engine and a short budget in place of the real model."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    out = tmp_path / recipe
    overrides = ["--model_path", "tiny-reasoner", "--dtype", "float32", "--sampling.engine", "hf", "--sampling.max_new_tokens", "8"]
    overrides += ["--data.data_files", json.dumps({"test": str(SAMPLES / sample)}), "--output_dir", str(out)]
    if recipe in ("gsm8k", "math500"):  # their protocol (paper) fixes the budget at 2,048 tokens
        overrides += ["--protocol", "greedy"]
    run(["evaluate", "--config", str(recipes / f"evaluate_{recipe}.yaml"), *overrides])
    summary = json.loads((out / "metrics.json").read_text())
    protocol = summary["protocol"]
    assert summary["metrics"]["num_completions"] == 6 * protocol["samples_per_problem"]
    assert protocol["grader"]["math_verify_version"] and protocol["prompt"]["instruction"]


def test_problem_answer_rows_are_told_apart_and_an_answer_of_zero_counts():
    aime = [{"Problem": "How many?", "Answer": "0"}]
    amc = [{"problem": "Compute half.", "answer": "\\frac{1}{2}"}]
    math = [{"problem": "p", "answer": 0, "solution": "so \\boxed{1}"}]
    assert [e.answer for e in parse_rows(aime, "auto", ColumnSpec(), "aime.jsonl", "t", seed=0)[0]] == ["0"]
    assert [e.answer for e in parse_rows(amc, "auto", ColumnSpec(), "amc.jsonl", "t", seed=0)[0]] == ["0.5"]
    assert [e.answer for e in parse_rows(math, "math", ColumnSpec(), "math.jsonl", "t", seed=0)[0]] == ["0"]  # the column, not the box


def test_problem_answer_rows_are_aime_only_if_every_answer_is_an_aime_integer():
    rows = [{"problem": "a", "answer": "3"}, {"problem": "b", "answer": "\\frac{1}{2}"}, {"problem": "c", "answer": "1024"}]
    examples, skipped = parse_rows(rows, "auto", ColumnSpec(), "mixed.jsonl", "t", seed=0, skip_bad_rows=True)
    assert ([e.answer for e in examples], skipped) == (["3", "0.5", "1024"], 0)
