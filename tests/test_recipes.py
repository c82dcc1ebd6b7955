"""Every recipe is exercised through the real CLI: tiny ones run, real-model ones parse and build."""

import json
from pathlib import Path

import pytest
import torch

from ipg_lightning.attribution import IPGAttribution
from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.cli import main, run
from ipg_lightning.cli.lightning_commands import parse_attribute, parse_steer, parse_train_reasoner, parse_train_sae
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.steering.learned import GateSteering, load_steering_checkpoint
from ipg_lightning.vectors import load_vectors

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("attribute_*.yaml"))
STEER_RECIPES = sorted(RECIPE_DIR.glob("steer_*.yaml"))
FUNCTION_RECIPES = sorted(RECIPE_DIR.glob("evaluate_*.yaml")) + sorted(RECIPE_DIR.glob("export_*.yaml")) + sorted(RECIPE_DIR.glob("lm-eval_*.yaml"))
TRAIN_RECIPES = sorted(RECIPE_DIR.glob("train_tiny_reasoner*.yaml"))
SAE_RECIPES = sorted(RECIPE_DIR.glob("train_*sae*.yaml"))
TINY = str(RECIPE_DIR / "attribute_tiny.yaml")


def test_every_recipe_is_covered():
    covered = RECIPES + STEER_RECIPES + FUNCTION_RECIPES + TRAIN_RECIPES + SAE_RECIPES
    assert {p.name for p in RECIPE_DIR.glob("*.yaml")} == {p.name for p in covered}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_against_the_attribution_entry_point(recipe):
    cli = parse_attribute(["--config", str(recipe)])
    assert isinstance(cli.model, IPGAttribution) and isinstance(cli.datamodule, ReasoningDataModule)
    assert cli.trainer.validate_loop.inference_mode is False
    assert cli.model.hparams.method in ("ipg", "grad_x_act", "random", "activation", "mean_diff", "ig_reference")
    assert cli.model.lm is None  # weights load in setup, not at parse time


def test_tiny_recipe_runs_end_to_end_with_overrides(tmp_path, capsys):
    out = tmp_path / "report"
    run(["attribute", "--config", TINY, "--model.steps", "2", "--model.output_dir", str(out), "--trainer.enable_progress_bar", "false"])
    report = AttributionReport.load(out)
    assert report.metadata.config["steps"] == 2
    assert set(report.scores) == {"blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"}
    printed = capsys.readouterr().out
    assert "completeness:" in printed and "top 10:" in printed
    assert json.loads((out / "attribution.json").read_text())["counts"]["prompts"] == 4


def test_cli_names_a_bad_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", "--config", TINY, "--model.stpes", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "stpes" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("recipe", STEER_RECIPES, ids=lambda p: p.name)
def test_steer_recipe_parses_against_the_steering_entry_point(recipe):
    cli = parse_steer(["--config", str(recipe)])
    assert isinstance(cli.model, GateSteering)
    assert cli.model.lm is None and cli.config.ckpt_path is None
    assert cli.model.selection.components or cli.model.selection.report


def test_tiny_steer_recipe_trains_and_its_checkpoint_reloads(tmp_path, capsys):
    run(
        [
            "steer",
            "--config",
            str(RECIPE_DIR / "steer_tiny.yaml"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1 and (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    module = load_steering_checkpoint(checkpoints[0])
    assert module.lora is not None and len(module.components) == 3
    assert "trained gates:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fine_tune", "merged"),
    [
        (["--model.lora.placement", "localized", "--model.train_gates", "false"], "lora"),
        (["--model.lora", "null", "--model.weight_slices", "true"], "slices"),
    ],
    ids=["localized_lora", "weight_slices"],
)
def test_steer_places_the_fine_tune_from_the_selection_and_export_names_it(tmp_path, capsys, fine_tune, merged):
    logs = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    run(["steer", "--config", str(RECIPE_DIR / "steer_tiny.yaml"), *logs, *fine_tune])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    recorded = load_steering_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["ipg_steering"]
    run(["export", "--steering_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "export")])
    card = json.loads((tmp_path / "export" / "steering_card.json").read_text())
    # steer_tiny selects neurons 3 and 7 of block 1 and head 1 of block 0 (Llama, 4 heads in 2 key/value groups).
    if merged == "lora":
        expected = [f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [f"model.layers.1.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
        assert card["lora_weights"]["modules"] == expected == saved["adapter_targets"]["modules"] == list(recorded.fine_tune.adapter.modules)
        assert f"trained LoRA (localized) on: {', '.join(expected)}" in capsys.readouterr().out
        assert card["weight_slices_merged"] == [] and card["gates"] == {}  # the gates did not train
    else:
        expected = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"]
        expected += [f"model.layers.1.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
        assert card["weight_slices_merged"] == expected and card["lora_weights"] is None
        assert f"weight slices merged into {expected}" in capsys.readouterr().out
        assert {piece["module"] for piece in saved["weight_slices"]} == set(expected)
        o_proj = next(piece for piece in saved["weight_slices"] if piece["module"] == "model.layers.0.self_attn.o_proj")
        assert (o_proj["dim"], tuple(o_proj["indices"])) == (1, tuple(range(8, 16)))  # head 1's input columns (head_dim 8)


def test_steer_learns_vectors_alone_and_evaluate_and_export_apply_them(tmp_path, capsys):
    logs = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    vectors = ["--model.selection", "null", "--model.lora", "null", "--model.vectors.layers", "[1]", "--model.vectors.max_norm", "0.5"]
    run(["steer", "--config", str(RECIPE_DIR / "steer_tiny.yaml"), *logs, *vectors, "--model.learning_rate", "0.5"])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    printed = capsys.readouterr().out
    assert "trained gates" not in printed and "trained steering vectors (norm): {'blocks.1.hook_resid_post': 0.5}" in printed  # the bound binds
    recorded = load_steering_checkpoint(checkpoint)
    assert recorded.gates is None and recorded.components == [] and list(recorded.vectors.sites) == ["blocks.1.hook_resid_post"]
    run(["export", "--steering_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "export")])
    card = json.loads((tmp_path / "export" / "steering_card.json").read_text())
    assert card["folded_vectors"] == ["blocks.1.hook_resid_post"] and card["loader_vectors"] == []
    data = ["--data.num_test", "4", "--sampling.max_new_tokens", "12"]
    run(["evaluate", "--steering_checkpoint", str(checkpoint), *data, "--output_dir", str(tmp_path / "steered")])
    run(["evaluate", "--model_path", str(tmp_path / "export"), *data, "--output_dir", str(tmp_path / "exported")])
    steered, exported = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("steered", "exported"))
    assert steered["steering"]["kind"] == "learned" and steered["steering"]["vectors"] == str(checkpoint)
    generations = [(tmp_path / name / "generations.jsonl").read_text() for name in ("steered", "exported")]
    assert generations[0] == generations[1] and steered["metrics"] == exported["metrics"]  # the export reproduces the learned vectors
    # written to a vector file, the learned vectors sweep like any other: at alpha 1 they are the checkpoint's steering
    file = tmp_path / "learned.safetensors"
    run(["vectors", "--source", "checkpoint", "--checkpoint", str(checkpoint), "--output", str(file)])
    loaded = load_vectors(file, recorded.lm)
    torch.testing.assert_close(loaded.vector("blocks.1.hook_resid_post"), recorded.vectors.vector("blocks.1.hook_resid_post"))
    assert loaded.provenance["source"] == "learned" and loaded.provenance["checkpoint"] == str(checkpoint) and loaded.alpha == 1.0
    assert loaded.provenance["max_norm"] == 0.5 and loaded.provenance["learned_beside"] == []
    run(["evaluate", "--model_path", "tiny:llama", "--vectors", str(file), "--alphas", "[0, 1]", *data, "--output_dir", str(tmp_path / "sweep")])
    rows = {row.pop("alpha"): row for row in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]}
    assert rows[1.0] == steered["metrics"] and rows[0.0] != rows[1.0]
    with pytest.raises(ValueError, match="--layers build vectors from the model's trajectories; --source checkpoint takes the learned ones"):
        run(["vectors", "--source", "checkpoint", "--checkpoint", str(checkpoint), "--layers", "[0]", "--output", str(tmp_path / "x.safetensors")])
    with pytest.raises(ValueError, match="goes with --source checkpoint"):
        run(["vectors", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "x.safetensors"), "--model_path", "tiny:llama"])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("recipe", FUNCTION_RECIPES, ids=lambda p: p.name)
def test_evaluate_and_export_recipes_parse(recipe, capsys):
    command = recipe.name.split("_")[0]
    with pytest.raises(SystemExit) as exit_info:
        run([command, "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    assert "output_dir" in capsys.readouterr().out


def test_tiny_evaluate_and_export_recipes_run(tmp_path):
    run(["evaluate", "--config", str(RECIPE_DIR / "evaluate_tiny.yaml"), "--output_dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["num_completions"] == 8
    run(["export", "--config", str(RECIPE_DIR / "export_tiny.yaml"), "--output_dir", str(tmp_path / "export")])
    card = json.loads((tmp_path / "export" / "steering_card.json").read_text())
    assert card["loader_sites"] == ["blocks.1.hook_resid_post"]
    assert set(card["folded_sites"]) == {"blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_train_recipe_parses(recipe):
    from ipg_lightning.zoo.reasoner import ReasonerTraining

    cli = parse_train_reasoner(["--config", str(recipe)])
    assert isinstance(cli.model, ReasonerTraining)
    assert cli.config.output_dir == "ipg_lightning/zoo/checkpoints/tiny-reasoner"
    assert sum(p.numel() for p in cli.model.lm.parameters()) < 5_000_000


def test_sae_recipes_parse_and_the_tiny_one_is_the_shipped_sae():
    from ipg_lightning.sae import load_sae
    from ipg_lightning.sae.training import SAETraining
    from ipg_lightning.zoo.reasoner import TINY_REASONER_SAE_PATH

    parsed = {recipe.name: parse_train_sae(["--config", str(recipe)]) for recipe in SAE_RECIPES}
    assert set(parsed) == {"train_tiny_sae.yaml", "train_sae_qwen_math_gsm8k.yaml"}
    assert all(isinstance(cli.model, SAETraining) and cli.model.traces is not None and cli.model.lm is None for cli in parsed.values())
    tiny, shipped = parsed["train_tiny_sae.yaml"], load_sae(TINY_REASONER_SAE_PATH)
    assert tiny.config.output_dir == "ipg_lightning/zoo/checkpoints/tiny-reasoner-sae"
    assert (tiny.model.hparams.hook_name, tiny.model.hparams.k) == (shipped.hook_name, shipped.k)
    paper = parsed["train_sae_qwen_math_gsm8k.yaml"].model.hparams
    assert (paper.hook_name, paper.expansion, paper.k) == ("blocks.21.hook_resid_post", 16, 32)  # the paper's IPG-SAE
