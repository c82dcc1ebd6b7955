import json

import pandas as pd
import pytest

from ipg_lightning.data import (
    ArithmeticChainTask,
    BadRowError,
    ColumnSpec,
    DataSourceError,
    PromptTemplate,
    ReasoningDataModule,
)
from ipg_lightning.zoo.tiny import tiny_tokenizer

GSM8K_ROWS = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(20)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _all_ids(module, split):
    return [example.id for example in module.examples[split]]


def test_gsm8k_jsonl_is_parsed_split_and_batched(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    module = ReasoningDataModule(source=str(path), val_fraction=0.2, test_fraction=0.2, batch_size=3, num_train=None)
    module.connect(tokenizer)
    module.setup()
    sizes = {split: len(module.examples[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 4, "test": 4}
    questions = [set(e.question for e in module.examples[s]) for s in ("train", "val", "test")]
    assert not (questions[0] & questions[1]) and not (questions[1] & questions[2]) and not (questions[0] & questions[2])
    batch = next(iter(module.val_dataloader()))
    assert len(batch["prompt"]) == 3 and batch["seed"].shape == (3,)
    example = module.examples["val"][0]
    assert batch["answer"][0] == example.answer and example.solution.endswith(f"#### {example.answer}")
    assert batch["prompt"][0].endswith(f"Question: {example.question}\nAnswer:")


def test_math_csv_and_parquet_formats(tmp_path):
    math_rows = [{"problem": f"Compute {i}+{i}.", "solution": f"We get $\\boxed{{{2 * i}}}$."} for i in range(10)]
    (tmp_path / "math.json").write_text(json.dumps(math_rows))
    module = ReasoningDataModule(data_files={"test": str(tmp_path / "math.json")}, num_test=None)
    module.setup()
    assert [e.answer for e in module.examples["test"]][:3] == ["0", "2", "4"]

    pd.DataFrame({"prompt": ["1+1?", "2+5?"], "target": ["2", "7"]}).to_csv(tmp_path / "plain.csv", index=False)
    columns = ColumnSpec(question="prompt", answer="target")
    module = ReasoningDataModule(data_files={"val": str(tmp_path / "plain.csv")}, row_format="columns", columns=columns)
    module.setup()
    assert [(e.question, e.answer) for e in module.examples["val"]] == [("1+1?", "2"), ("2+5?", "7")]

    pd.DataFrame(GSM8K_ROWS[:5]).to_parquet(tmp_path / "gsm.parquet")
    module = ReasoningDataModule(data_files={"train": str(tmp_path / "gsm.parquet")})
    module.setup()
    assert [e.answer for e in module.examples["train"]] == ["2", "3", "4", "5", "6"]


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"answer": "#### 3"}, "missing field 'question'"),
        ({"question": "   ", "answer": "#### 3"}, "field 'question' is empty"),
        ({"question": "How many?", "answer": "three"}, "no '#### <answer>' line"),
        ({"question": "How many?", "answer": "#### lots"}, "'lots' is not a number"),
    ],
)
def test_bad_rows_raise_naming_file_and_row_or_are_skipped_and_counted(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", GSM8K_ROWS[:3] + [bad_row] + GSM8K_ROWS[3:6])
    with pytest.raises(BadRowError, match=f"bad.jsonl row 3: .*{message}"):
        ReasoningDataModule(data_files={"test": str(path)}, row_format="gsm8k").setup()
    module = ReasoningDataModule(data_files={"test": str(path)}, row_format="gsm8k", on_bad_row="skip")
    module.setup()
    assert len(module.examples["test"]) == 6
    assert module.skipped_rows == {str(path): 1}


def test_unreadable_sources_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(GSM8K_ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataSourceError, match="broken.jsonl: line 2 is not valid JSON"):
        ReasoningDataModule(source=str(broken)).setup()
    with pytest.raises(DataSourceError, match="Data file not found: .*missing.jsonl"):
        ReasoningDataModule(source=str(tmp_path / "missing.jsonl")).setup()
    with pytest.raises(DataSourceError, match="unsupported file type '.txt'"):
        ReasoningDataModule(data_files={"test": str(tmp_path / "x.txt")}).setup()
    with pytest.raises(DataSourceError, match="Could not load hub dataset 'openai/gsm8k'.*local"):
        ReasoningDataModule(source="openai/gsm8k", hub_config="main").setup()
    with pytest.raises(ValueError, match="data_files keys"):
        ReasoningDataModule(data_files={"validation": "x.jsonl"})


def test_synthetic_task_splits_are_exact_disjoint_and_deterministic():
    task = ArithmeticChainTask(min_steps=3, max_steps=3, seed=5)
    module = ReasoningDataModule(synthetic_task=task, num_train=40, num_val=8, num_test=8)
    module.setup()
    again = ReasoningDataModule(synthetic_task=task, num_train=40, num_val=8, num_test=8)
    again.setup()
    assert module.examples == again.examples
    questions = {s: {e.question for e in module.examples[s]} for s in ("train", "val", "test")}
    assert [len(q) for q in questions.values()] == [40, 8, 8]
    assert not (questions["val"] & questions["test"]) and not (questions["train"] & questions["test"])
    for example in module.examples["test"]:
        assert example.solution.count("\n") == 3  # three steps, then the answer line
        assert example.solution.endswith(f"#### {example.answer}")


def test_synthetic_task_knobs_and_reflection_steps():
    task = ArithmeticChainTask(min_steps=1, max_steps=6, operations=("+",), reflection_probability=1.0, seed=0)
    examples = [task.example(i) for i in range(30)]
    assert all("*" not in e["solution"] and " - " not in e["solution"] for e in examples)
    assert all("Wait, let me check" in e["solution"] for e in examples)
    assert len({e["solution"].count("\n") for e in examples}) > 3  # lengths vary
    for example in examples:  # every step line is arithmetically right
        value = int(example["question"].split("Start with ")[1].split(".")[0])
        total = value + sum(int(x) for x in example["question"].split("dd ")[1:] for x in [x.split(",")[0].split(".")[0]])
        assert example["answer"] == str(total)
    with pytest.raises(ValueError, match="operations"):
        ArithmeticChainTask(operations=("/",))
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticChainTask(min_steps=3, max_steps=2)


def test_reasoning_gym_task_offline():
    module = ReasoningDataModule(source="reasoning_gym:gsm_symbolic", num_train=4, num_val=3, num_test=3, seed=1)
    module.setup()
    test = module.examples["test"]
    assert len(test) == 3 and all(e.solution and e.solution.endswith(f"#### {e.answer}") for e in test)
    module = ReasoningDataModule(source="reasoning_gym:basic_arithmetic", num_train=4, num_val=2, num_test=2)
    module.setup()
    assert all(e.solution is None for e in module.examples["val"])
    with pytest.raises(DataSourceError, match="reasoning-gym task 'no_such_task'"):
        ReasoningDataModule(source="reasoning_gym:no_such_task", num_train=1, num_val=1, num_test=1).setup()
    # knobs that pass the task's config but break generation: named, not a traceback from inside the task
    bad = {"operators": ["+", "-"], "operators_weights": [1.0]}
    with pytest.raises(DataSourceError, match="reasoning-gym task 'simple_equations' .* failed: .*check the task's settings"):
        ReasoningDataModule(source="reasoning_gym:simple_equations", task_kwargs=bad, num_train=1, num_val=1, num_test=1).setup()


def test_reasoning_gym_task_with_few_distinct_problems_draws_more():
    # one-digit a +- b has 242 distinct questions, but the first 2 * 224 + 16 draws hold only 208 of them
    knobs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}
    knobs |= {"allow_parentheses": False, "allow_negation": False}

    def examples(num_val: int) -> dict[str, list[str]]:
        module = ReasoningDataModule(source="reasoning_gym:basic_arithmetic", task_kwargs=knobs, num_train=0, num_val=num_val, num_test=128)
        module.setup()
        return {split: [e.question for e in module.examples[split]] for split in ("test", "val")}

    short, long = examples(64), examples(96)
    assert len(set(long["test"] + long["val"])) == 224
    assert long["test"] == short["test"] and long["val"][:64] == short["val"]  # a longer stream starts with the shorter one
    with pytest.raises(DataSourceError, match=r"gave only 242 distinct problems, 243 were asked for"):
        examples(115)


def test_example_seeds_do_not_depend_on_batching():
    small = ReasoningDataModule(num_train=8, num_val=8, num_test=8, batch_size=2)
    large = ReasoningDataModule(num_train=8, num_val=8, num_test=8, batch_size=8)
    seeds_small = [s for batch in small.val_dataloader() for s in batch["seed"].tolist()]
    seeds_large = next(iter(large.val_dataloader()))["seed"].tolist()
    assert seeds_small == seeds_large and len(set(seeds_large)) == 8
    whole = small.full_batch("test")
    batches = list(small.test_dataloader())
    for key in ("id", "prompt", "answer"):
        assert whole[key] == [value for batch in batches for value in batch[key]]
    assert whole["seed"].tolist() == [seed for batch in batches for seed in batch["seed"].tolist()]


def test_prompt_templates_plain_and_chat():
    template = PromptTemplate(instruction="Solve.", system_prompt="Be brief.")
    assert template.render("1+1?") == "Solve.\n\nQuestion: 1+1?\nAnswer:"
    assert template.render("1+1?", tiny_tokenizer(chat_template=True)) == "<system>Be brief.\n<user>Solve.\n\n1+1?\n<assistant>"
    plain = PromptTemplate(use_chat_template=False)
    assert plain.render("q", tiny_tokenizer(chat_template=True)).endswith("Question: q\nAnswer:")
    with pytest.raises(ValueError, match="question"):
        PromptTemplate(plain_format="{instruction}")
