import json
from pathlib import Path

import pytest

from ipg_lightning.cli import run
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import gates_for_components

COMPONENTS = '["blocks.1.attn.hook_z[0]", "blocks.1.attn.hook_z[3]", "blocks.0.mlp.hook_post[9]"]'
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "attribute_tiny.yaml"
COMMON = ["--data.num_test", "4", "--data.num_val", "2", "--data.num_train", "0", "--sampling.max_new_tokens", "16"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_metrics_and_generations_matching_an_independent_run(tmp_path, tiny_llama, tokenizer):
    run(["evaluate", "--selection.components", COMPONENTS, "--gamma", "0", "--output_dir", str(tmp_path / "fixed"), *COMMON])
    summary = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    for key in ("accuracy", "answer_rate", "reasoning_length_mean", "reasoning_length_q90", "reflection_rate", "num_completions"):
        assert key in summary["metrics"]
    assert summary["steering"]["kind"] == "fixed" and summary["split"] == "test"
    generations = _lines(tmp_path / "fixed" / "generations.jsonl")
    assert len(generations) == summary["metrics"]["num_completions"] == 4

    data = ReasoningDataModule(num_train=0, num_val=2, num_test=4)
    data.connect(tokenizer)
    gates = gates_for_components(tiny_llama, json.loads(COMPONENTS), 0.0)
    independent = evaluate_generations(
        tiny_llama, tokenizer, list(data.test_dataloader()), SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=16), gates
    )
    assert [g["completion"] for g in generations] == [r["completion"] for r in independent.records]
    assert summary["metrics"] == pytest.approx(independent.metrics)


def test_an_exported_checkpoint_evaluates_like_the_steered_model(tmp_path):
    run(["evaluate", "--selection.components", COMPONENTS, "--gamma", "0", "--output_dir", str(tmp_path / "fixed"), *COMMON])
    run(
        [
            "export",
            "--selection.components",
            COMPONENTS,
            "--gamma",
            "0",
            "--output_dir",
            str(tmp_path / "exported"),
            "--metrics",
            str(tmp_path / "fixed" / "metrics.json"),
        ]
    )
    run(["evaluate", "--model_path", str(tmp_path / "exported"), "--output_dir", str(tmp_path / "from_export"), *COMMON])
    fixed = _lines(tmp_path / "fixed" / "generations.jsonl")
    exported = _lines(tmp_path / "from_export" / "generations.jsonl")
    assert [g["completion"] for g in fixed] == [g["completion"] for g in exported]
    card = json.loads((tmp_path / "exported" / "steering_card.json").read_text())
    assert card["metrics"]["num_completions"] == 4


def test_sweep_table_and_plot_with_gamma_one_equal_to_base(tmp_path):
    run(
        [
            "attribute",
            "--config",
            str(RECIPE),
            "--model.steps",
            "2",
            "--model.output_dir",
            str(tmp_path / "report"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run(
        [
            "evaluate",
            "--selection.report",
            str(tmp_path / "report"),
            "--ks",
            "[2, 6]",
            "--gammas",
            "[0.0, 1.0, 2.0]",
            "--output_dir",
            str(tmp_path / "sweep"),
            *COMMON,
        ]
    )
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert len(rows) == 1 + 2 * 3
    base = rows[0]
    for row in rows:
        if row["gamma"] == 1.0:  # gates at 1 change nothing
            assert {k: v for k, v in row.items() if k not in ("k", "gamma")} == {k: v for k, v in base.items() if k not in ("k", "gamma")}
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[0].startswith("k,gamma,accuracy")


def test_bad_evaluate_and_export_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="Nothing to export"):
        run(["export", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="give --selection.report"):
        run(["evaluate", "--gammas", "[0.5]", "--output_dir", str(tmp_path / "y"), *COMMON])
    with pytest.raises(ValueError, match="gamma must be finite and >= 0, got -1"):
        run(["evaluate", "--selection.components", COMPONENTS, "--gamma", "-1", "--output_dir", str(tmp_path / "z"), *COMMON])
    assert not any(tmp_path.iterdir())


def test_export_refuses_metrics_of_another_model_or_other_steering(tmp_path):
    from ipg_lightning.model.identity import ModelMismatchError

    run(["evaluate", "--output_dir", str(tmp_path / "base"), *COMMON])  # the unsteered model
    run(
        [
            "evaluate",
            "--model_path",
            "tiny:qwen2",
            "--selection.components",
            COMPONENTS,
            "--gamma",
            "0",
            "--output_dir",
            str(tmp_path / "qwen2"),
            *COMMON,
        ]
    )
    run(["evaluate", "--selection.components", COMPONENTS, "--gamma", "0.5", "--output_dir", str(tmp_path / "half"), *COMMON])
    export = ["export", "--selection.components", COMPONENTS, "--gamma", "0", "--output_dir", str(tmp_path / "exported"), "--metrics"]
    with pytest.raises(ModelMismatchError, match=r"--metrics .*qwen2 measured tiny:qwen2 .*, but the export is of tiny:llama"):
        run([*export, str(tmp_path / "qwen2")])
    with pytest.raises(ValueError, match=r"measured other steering than this export \(kind 'base' there, 'fixed' here"):
        run([*export, str(tmp_path / "base")])
    with pytest.raises(ValueError, match=r"measured other steering than this export \(gamma 0.5 there, 0.0 here\)"):
        run([*export, str(tmp_path / "half")])
    assert not (tmp_path / "exported").exists()
