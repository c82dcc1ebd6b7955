"""Regression tests for bad input: each reproduces a finding of the hardening review and asserts the safe behaviour.

Overwrite safety and stale stages are in ``test_outputs.py``; the CLI's one-line messages in ``test_cli.py``.
"""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ipg_lightning.attribution import IPGAttribution
from ipg_lightning.attribution.report import AttributionReport, UninformativeReportError
from ipg_lightning.cli import run
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.gates.exported import CONFIG_MARKER, load_steered, read_card
from ipg_lightning.model.identity import ModelMismatchError, model_identity
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.steering.learned import GateSteering, SteeringCheckpointError, load_steering_checkpoint
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
REASONER = TINY_REASONER_PATH
QUICK = ["--data.num_test", "2", "--data.num_val", "1", "--data.num_train", "0", "--sampling.max_new_tokens", "4"]
INPUT = torch.tensor([[5, 17, 30, 42, 8, 61, 9, 23]])


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in ("steering.loading", "task", "steering.learned", "cli.demo_stages"):
        monkeypatch.setattr(f"ipg_lightning.{module}.load_model_and_tokenizer", refuse)


@pytest.fixture(scope="module")
def steering_checkpoint(tmp_path_factory):
    """A real `GateSteering` checkpoint of tiny:llama (two policy-gradient steps)."""
    root = tmp_path_factory.mktemp("steer")
    module = GateSteering(
        selection=ComponentSelection(components=("blocks.1.mlp.hook_post[3]", "blocks.0.attn.hook_z[1]")),
        model_path="tiny:llama",
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=6, num_samples=2, temperature=1.0, top_p=1.0),
    )
    data = ReasoningDataModule(num_train=2, num_val=1, num_test=1, batch_size=2, template=PromptTemplate(use_chat_template=False))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "gates.ckpt")
    return root / "gates.ckpt"


def _rewritten(checkpoint_path, target, edit):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


# ----------------------------------------------------------------------------- 3. no code from data files
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_pickled_checkpoint_is_refused_without_running_its_code(tmp_path, command):
    marker = tmp_path / "pwned"
    torch.save({"ipg_steering": {"components": ["blocks.0.mlp.hook_post[1]"]}, "payload": _RunsCode(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(SteeringCheckpointError, match="refusing to unpickle"):
        run([command, "--steering_checkpoint", str(tmp_path / "evil.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def _planted_reward_checkpoint(tmp_path, monkeypatch, steering_checkpoint, module_name):
    """A copy of the checkpoint whose reward names a module that leaves a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / f"{module_name}.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef reward(completion):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    planted = _rewritten(steering_checkpoint, tmp_path / "planted.ckpt", lambda c: c["hyper_parameters"].update(reward=f"{module_name}:reward"))
    return planted, marker


def test_the_reward_a_checkpoint_names_is_never_imported_to_evaluate_or_export(tmp_path, monkeypatch, steering_checkpoint):
    planted, marker = _planted_reward_checkpoint(tmp_path, monkeypatch, steering_checkpoint, "planted_reward")
    run(["evaluate", "--steering_checkpoint", str(planted), "--output_dir", str(tmp_path / "eval"), *QUICK])
    run(["export", "--steering_checkpoint", str(planted), "--output_dir", str(tmp_path / "export")])
    module = load_steering_checkpoint(planted)
    with pytest.raises(PermissionError, match="trust_reward=True"):
        module.reward_fn  # noqa: B018
    assert not marker.exists()
    load_steering_checkpoint(planted, trust_reward=True).reward_fn  # noqa: B018 (the caller's explicit choice)
    assert marker.exists()


def test_damaged_and_diverged_checkpoints_are_named(tmp_path, steering_checkpoint):
    (tmp_path / "cut.ckpt").write_bytes(steering_checkpoint.read_bytes()[:500])
    with pytest.raises(SteeringCheckpointError, match="cut.ckpt cannot be read as a checkpoint"):
        load_steering_checkpoint(tmp_path / "cut.ckpt")

    def poison(checkpoint):
        key = next(k for k in checkpoint["state_dict"] if k.startswith("gates."))
        checkpoint["state_dict"][key][0] = float("nan")

    with pytest.raises(SteeringCheckpointError, match="non-finite values.*diverged"):
        load_steering_checkpoint(_rewritten(steering_checkpoint, tmp_path / "nan.ckpt", poison))


# ----------------------------------------------------------------------------- 4 and 8. settings checked first
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.num_test", "-3"], "num_test must be >= 0"),
        (["--data.val_fraction", "0.7", "--data.test_fraction", "0.5"], "sum below 1"),
        (["--split", "dev"], "Unknown split 'dev'"),
        (["--sampling.temperature", "0", "--sampling.num_samples", "3"], "identical completions"),
        (["--selection.components", '["blocks.0.mlp.hook_post[1]"]', "--gamma", "-0.5"], "gamma must be finite and >= 0"),
        (["--selection.report", "r", "--selection.k", "0"], "k must be >= 1"),
    ],
)
def test_evaluate_refuses_bad_settings_before_loading_a_model(tmp_path, monkeypatch, flags, message):
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run(["evaluate", *flags, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.steps", "0"], "steps must be >= 1, got 0"),
        (["--model.chunk_size", "0"], "chunk_size must be >= 1, got 0"),
        (["--model.sampling.num_samples", "1"], "num_samples must be >= 2"),
        (["--model.sampling.temperature", "0"], "temperature 0 .* identical samples"),
        (["--model.families", "[]"], "families is empty"),
        (["--model.layers", "[]"], "layers is empty"),
    ],
)
def test_attribute_refuses_bad_settings_before_loading_a_model(tmp_path, monkeypatch, flags, message):
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run(["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), *flags, "--model.output_dir", str(tmp_path / "r")])


def test_negative_split_sizes_are_refused_rather_than_leaking_training_problems():
    with pytest.raises(ValueError, match="num_test must be >= 0"):
        ReasoningDataModule(num_test=-3)
    data = ReasoningDataModule(num_train=20, num_val=4, num_test=5)
    data.setup()
    questions = {split: {e.question for e in examples} for split, examples in data.examples.items()}
    assert len(questions["test"]) == 5 and not questions["test"] & (questions["train"] | questions["val"])


# ----------------------------------------------------------------------------- 5. exports that cannot be misused
def _gated_logits(model, *gate_sets):
    from contextlib import ExitStack

    with torch.no_grad(), ExitStack() as stack:
        for gates in gate_sets:
            stack.enter_context(gates.attach(model))
        return model(INPUT).logits


def test_re_exporting_an_export_keeps_its_residual_gates_and_composes_new_ones(tmp_path, tiny_model, tokenizer):
    first = gates_for_components(tiny_model("llama"), ["blocks.1.hook_resid_post[3]", "blocks.0.mlp.hook_post[2]"], 0.5)
    second_names = ["blocks.1.hook_resid_post[3]", "blocks.1.hook_resid_post[7]", "blocks.0.attn.hook_z[1]"]
    second = gates_for_components(tiny_model("llama"), second_names, 1.5)
    expected = _gated_logits(tiny_model("llama"), first, second)  # A then B on the original model

    export_steered_model(tiny_model("llama"), tokenizer, first, tmp_path / "a", source={"kind": "fixed", "model": "tiny:llama"})
    run(
        [
            "export",
            "--model_path",
            str(tmp_path / "a"),
            "--selection.components",
            json.dumps(second_names),
            "--gamma",
            "1.5",
            "--output_dir",
            str(tmp_path / "ab"),
        ]
    )
    card = read_card(tmp_path / "ab")
    assert card["loader_sites"] == ["blocks.1.hook_resid_post"] and card["previous"]["gates"]["blocks.1.hook_resid_post[3]"] == 0.5
    assert card["carried_gates"] == {"blocks.1.hook_resid_post[3]": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(load_steered(tmp_path / "ab")(INPUT).logits, expected, rtol=1e-5, atol=1e-5)


def test_an_export_that_needs_the_loader_says_so_to_plain_hugging_face_tooling(tmp_path, tokenizer):
    model = load_steered(REASONER)
    gates = gates_for_components(model, ["blocks.2.hook_resid_post[5]"], 0.0)
    export_steered_model(model, tokenizer, gates, tmp_path / "export", source={"kind": "fixed", "model": REASONER})
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config[CONFIG_MARKER]["loader"] == "ipg_lightning.load_steered"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Load with `ipg_lightning.load_steered(path)`" in card and "**without** them" in card
    assert "## Card of the source model" in card and "0.87 M-parameter llama" in card  # the reasoner's own card, carried
    # A plain HF re-save of the loaded model keeps the marker, and the loader then refuses the incomplete copy.
    load_steered(tmp_path / "export").save_pretrained(tmp_path / "resaved")
    with pytest.raises(FileNotFoundError, match="steering.safetensors, which is missing"):
        load_steered(tmp_path / "resaved")


def test_a_folded_export_has_no_marker_and_its_card_says_plain_loading_works(tmp_path, tiny_llama, tokenizer):
    export_steered_model(tiny_llama, tokenizer, gates_for_components(tiny_llama, ["blocks.0.mlp.hook_post[1]"], 0.0), tmp_path / "x")
    assert CONFIG_MARKER not in json.loads((tmp_path / "x" / "config.json").read_text())
    assert "reproduces the steered model" in (tmp_path / "x" / "README.md").read_text()


# ----------------------------------------------------------------------------- 6. identity checks
def test_a_report_of_another_model_is_refused_naming_both(tmp_path, tiny_llama):
    run(
        [
            "attribute",
            "--config",
            str(RECIPES / "attribute_tiny.yaml"),
            "--model.steps",
            "2",
            "--model.output_dir",
            str(tmp_path / "report"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    identity = AttributionReport.load(tmp_path / "report").metadata.model_identity
    assert identity == model_identity(tiny_llama, "tiny:llama")
    with pytest.raises(ModelMismatchError, match=r"computed on tiny:llama \(llama, 2 blocks.*the model is .*tiny-reasoner \(llama, 4 blocks"):
        run(
            [
                "evaluate",
                "--selection.report",
                str(tmp_path / "report"),
                "--selection.k",
                "2",
                "--model_path",
                REASONER,
                "--output_dir",
                str(tmp_path / "e"),
                *QUICK,
            ]
        )
    with pytest.raises(ModelMismatchError):
        run(
            [
                "steer",
                "--config",
                str(RECIPES / "steer_tiny.yaml"),
                "--model.model_path",
                REASONER,
                "--model.selection.components",
                "[]",
                "--model.selection.report",
                str(tmp_path / "report"),
                "--model.selection.k",
                "2",
                "--model.lora",
                "null",
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path / "s"),
            ]
        )
    other = GateSteering(ComponentSelection(report=str(tmp_path / "report"), k=2), model_path=REASONER, allow_other_model=True)
    other.build()  # asked for explicitly, the report's components are steered on the other model
    assert other.components == AttributionReport.load(tmp_path / "report").select(k=2)
    run(["evaluate", "--selection.report", str(tmp_path / "report"), "--selection.k", "2", "--output_dir", str(tmp_path / "same"), *QUICK])
    metrics = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert metrics["steering"]["model"] == "tiny:llama"  # the report's own model by default
    assert metrics["model_identity"]["config_hash"] == identity["config_hash"]


def test_a_report_without_an_identity_is_still_checked_by_its_site_sizes(tmp_path):
    sites = {"blocks.1.mlp.hook_post": {"family": "mlp_neuron", "layer": 1, "size": 64}}
    AttributionReport({"blocks.1.mlp.hook_post": torch.arange(64.0)}, sites, {"model": "tiny:llama"}).save(tmp_path / "old")
    with pytest.raises(ModelMismatchError, match="has 64 components at blocks.1.mlp.hook_post, this model has 384"):
        ComponentSelection(report=str(tmp_path / "old"), k=3).resolve(load_steered(REASONER), REASONER)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, steering_checkpoint):
    with pytest.raises(ModelMismatchError, match="steering checkpoint was computed on tiny:llama .* the model is tiny:qwen2"):
        run(
            ["evaluate", "--steering_checkpoint", str(steering_checkpoint), "--model_path", "tiny:qwen2", "--output_dir", str(tmp_path / "e"), *QUICK]
        )
    assert load_steering_checkpoint(steering_checkpoint).model_path == "tiny:llama"


# ----------------------------------------------------------------------------- 7. meaningless results
def test_selecting_more_components_than_exist_is_an_error_not_a_silent_cut():
    sites = {"blocks.0.attn.hook_z": {"family": "attn_head", "layer": 0, "size": 4}}
    report = AttributionReport({"blocks.0.attn.hook_z": torch.tensor([0.1, -3.0, 2.0, 0.5])}, sites)
    with pytest.raises(ValueError, match="k=100000, but the report has only 4 components: choose k <= 4"):
        report.select(k=100000)
    with pytest.raises(ValueError, match="no components of family 'mlp_neuron'"):
        report.select(k=1, family="mlp_neuron")
    zeros = AttributionReport({"blocks.0.attn.hook_z": torch.zeros(4)}, sites)
    with pytest.raises(UninformativeReportError, match="every score is exactly 0"):
        zeros.select(k=1)


def test_a_mean_diff_run_without_both_outcomes_is_refused(tiny_llama, tokenizer):
    module = IPGAttribution.for_model(
        tiny_llama,
        tokenizer,
        method="mean_diff",
        families=["mlp_out"],
        layers=[0],
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0),
    )
    data = ReasoningDataModule(num_train=0, num_val=2, num_test=0, batch_size=2, template=PromptTemplate(use_chat_template=False))
    with pytest.raises(UninformativeReportError, match="the rewards of all 2 prompts were equal"):
        L.Trainer(inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").validate(
            module, datamodule=data, verbose=False
        )


def test_a_prompt_longer_than_the_context_is_refused(tiny_llama, tokenizer):
    context = tiny_llama.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than the model's context of {context}"):
        sample_trajectories(tiny_llama, tokenizer, ["1 + 1 = " * context], SamplingConfig(num_samples=1, temperature=0, max_new_tokens=2))
    with pytest.warns(UserWarning, match="exceed the model's context"):
        sample_trajectories(tiny_llama, tokenizer, ["1+1="], SamplingConfig(num_samples=1, temperature=0, max_new_tokens=context))


def test_training_stops_when_a_gate_turns_non_finite(tmp_path, tiny_llama, tokenizer, quiet_trainer):
    module = GateSteering.for_model(
        tiny_llama,
        tokenizer,
        ComponentSelection(components=("blocks.0.hook_mlp_out",)),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=4, num_samples=2, temperature=1.0, top_p=1.0),
    )
    module.gates.gate("blocks.0.hook_mlp_out").data.fill_(float("inf"))
    data = ReasoningDataModule(num_train=2, num_val=1, num_test=1, batch_size=2, template=PromptTemplate(use_chat_template=False))
    with pytest.raises(FloatingPointError, match="became non-finite at step"):
        quiet_trainer(max_steps=1, enable_checkpointing=False).fit(module, datamodule=data)


def test_a_fresh_process_sees_the_loader_warning_in_the_exported_config(tmp_path, tiny_llama, tokenizer):
    """What a plain Hugging Face user sees: the marker is in the config transformers loads."""
    export_steered_model(tiny_llama, tokenizer, gates_for_components(tiny_llama, ["blocks.1.hook_resid_post[0]"], 0.0), tmp_path / "x")
    script = (
        "import sys; from transformers import AutoConfig; "
        "print(AutoConfig.from_pretrained(sys.argv[1]).to_dict()['ipg_lightning_steering']['loader'])"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x")], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "ipg_lightning.load_steered"


def test_an_export_of_a_declared_architecture_loads_without_the_declaration(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ipg_lightning.model.families import ArchitectureSpec

    config = AutoConfig.for_model(
        "opt",
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        vocab_size=128,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = ArchitectureSpec(layers="model.decoder.layers", attn_out_proj="self_attn.out_proj", mlp_out_proj="fc2")
    gates = gates_for_components(model, ["blocks.0.hook_resid_post[3]", "blocks.1.mlp.hook_post[5]"], 0.0, spec)
    expected = _gated_logits(model, gates)
    export_steered_model(model, tokenizer, gates, tmp_path / "opt", source={"kind": "fixed", "model": "tiny opt"})
    with torch.no_grad():
        torch.testing.assert_close(load_steered(tmp_path / "opt")(INPUT).logits, expected, rtol=1e-5, atol=1e-5)


def test_lightnings_own_loader_does_not_import_a_checkpoints_reward_either(tmp_path, monkeypatch, steering_checkpoint):
    planted, marker = _planted_reward_checkpoint(tmp_path, monkeypatch, steering_checkpoint, "planted_reward2")
    module = GateSteering.load_from_checkpoint(planted)
    with pytest.raises(PermissionError, match="trust_reward=True"):
        module.reward_fn  # noqa: B018
    assert not marker.exists()


def test_a_checkpoint_with_non_finite_gates_is_never_saved(tmp_path, tiny_llama, tokenizer, quiet_trainer):
    module = GateSteering.for_model(
        tiny_llama,
        tokenizer,
        ComponentSelection(components=("blocks.0.hook_mlp_out",)),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=4, num_samples=2, temperature=1.0, top_p=1.0),
    )
    trainer = quiet_trainer(max_steps=0)
    data = ReasoningDataModule(num_train=2, num_val=1, num_test=1, batch_size=2, template=PromptTemplate(use_chat_template=False))
    trainer.fit(module, datamodule=data)
    module.gates.gate("blocks.0.hook_mlp_out").data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.save_checkpoint(tmp_path / "nan.ckpt")
    assert not (tmp_path / "nan.ckpt").exists()
