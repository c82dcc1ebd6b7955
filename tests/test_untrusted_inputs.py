"""Hardening, round 2: the newer surfaces (SAE files, train-sae, steering checkpoints, resume, the
explorer) refuse numbers and names they cannot trust. Each test reproduces one finding of the review
and asserts the safe behaviour; output staging is in ``test_outputs.py``, SAE file contents in
``test_sae_formats.py``."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipg_lightning.cli import run
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
REASONER_SAE = Path(TINY_REASONER_SAE_PATH)
QUICK = ["--data.num_test", "2", "--data.num_val", "1", "--data.num_train", "0", "--sampling.max_new_tokens", "4"]


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in ("steering.loading", "task", "steering.learned", "explorer.page"):
        monkeypatch.setattr(f"ipg_lightning.{module}.load_model_and_tokenizer", refuse)


# ----------------------------------------------------------------------------- 2. non-finite SAE weights
def test_evaluate_refuses_an_sae_with_nan_instead_of_writing_metrics_of_empty_completions(tmp_path):
    damaged = tmp_path / "sae"
    shutil.copytree(REASONER_SAE, damaged)
    weights = load_file(str(damaged / "sae_weights.safetensors"))
    weights["W_dec"][5, 0] = float("nan")
    save_file(weights, str(damaged / "sae_weights.safetensors"))
    hook = json.loads((damaged / "cfg.json").read_text())["metadata"]["hook_name"]
    arguments = ["--model_path", TINY_REASONER_PATH, "--selection.components", f'["{hook}.sae[3]"]']
    arguments += ["--selection.saes", f'["{damaged}"]']
    with pytest.raises(ValueError, match=r"W_dec holds non-finite values \(NaN or inf\)"):
        run(["evaluate", *arguments, "--gamma", "1", "--output_dir", str(tmp_path / "eval"), *QUICK])
    assert not (tmp_path / "eval").exists()


def test_reports_and_exports_with_non_finite_numbers_are_refused_when_read(tmp_path):
    from ipg_lightning.attribution.report import AttributionReport
    from ipg_lightning.gates.exported import load_steered

    site = {"blocks.0.hook_mlp_out": {"family": "mlp_out", "layer": 0, "size": 1}}
    AttributionReport({"blocks.0.hook_mlp_out": torch.tensor([float("nan")])}, site).save(tmp_path / "report")
    with pytest.raises(ValueError, match=r"attribution.safetensors holds non-finite scores \(NaN or inf\) for \['blocks.0.hook_mlp_out'\]"):
        AttributionReport.load(tmp_path / "report")

    run(["export", "--config", str(RECIPES / "export_tiny.yaml"), "--output_dir", str(tmp_path / "export")])
    for file, name in (("steering.safetensors", None), ("model.safetensors", "model.layers.0.mlp.down_proj.weight")):
        damaged = tmp_path / f"damaged_{file}"
        shutil.copytree(tmp_path / "export", damaged)
        tensors = load_file(str(damaged / file))
        name = name or next(iter(tensors))
        tensors[name] = torch.full_like(tensors[name], float("inf"))
        save_file(tensors, str(damaged / file), metadata=_metadata(damaged / file))
        with pytest.raises(ValueError, match=rf"non-finite .*NaN or inf.*{name}"):
            load_steered(damaged)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


# ----------------------------------------------------------------------------- 3. train-sae settings and divergence
SAE_SMALL = ["--config", str(RECIPES / "train_tiny_sae.yaml"), "--model.model_path", TINY_REASONER_PATH]
SAE_SMALL += ["--model.traces", "null", "--data.num_train", "128", "--data.num_val", "64", "--trainer.val_check_interval", "1.0"]
SAE_SMALL += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.aux_k", "-3"], "aux_k must be >= 1, got -3"),
        (["--model.aux_coefficient", "-1"], "aux_coefficient must be a finite number >= 0, got -1.0"),
        (["--model.learning_rate", "0"], "learning_rate must be a finite number > 0, got 0.0"),
    ],
)
def test_train_sae_refuses_bad_settings_before_loading_a_model(tmp_path, monkeypatch, flags, message):
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run(["train-sae", *SAE_SMALL, *flags, "--trainer.default_root_dir", str(tmp_path), "--output_dir", str(tmp_path / "sae")])


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--model.learning_rate", "1e30"], FloatingPointError, r"became non-finite at step \d+: the training diverged and nothing was saved"),
        (["--model.learning_rate", "10"], FloatingPointError, r"reconstructs worse than the activations' mean \(validation FVU .* > 1\)"),
        (["--trainer.max_epochs", "0"], ValueError, r"No training step ran"),
    ],
    ids=["overflow", "worse-than-the-mean", "no-step"],
)
def test_a_diverged_or_untrained_sae_is_never_saved(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        run(["train-sae", *SAE_SMALL, *flags, "--trainer.default_root_dir", str(tmp_path), "--output_dir", str(tmp_path / "sae")])
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.expansion", str(10**9)], r"expansion 1000000000 gives an SAE of 128000000000 features over 128 channels, which needs"),
        (["--model.hook_name", "blocks.9.hook_resid_post"], r"hook_name blocks.9.hook_resid_post: .*9"),
        (["--model.hook_name", ""], r"hook_name: An SAE at '' cannot be spliced in"),
    ],
    ids=["too-large", "no-such-layer", "empty-hook"],
)
def test_sae_settings_the_model_cannot_take_are_named(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(["train-sae", *SAE_SMALL, *flags, "--trainer.default_root_dir", str(tmp_path), "--output_dir", str(tmp_path / "sae")])


def test_json_outputs_are_standard_json_without_nan(tmp_path):
    from ipg_lightning.outputs import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"loss_recovered": float("nan"), "rows": [{"x": float("-inf")}, 1.5]})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"loss_recovered": None, "rows": [{"x": None}, 1.5]}


# ----------------------------------------------------------------------------- 4-5. steering checkpoints and resume
def _steer(root, *flags):
    log = ["--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar", "false"]
    run(["steer", "--config", str(RECIPES / "steer_tiny.yaml"), *log, *flags])
    return root


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """The checkpoint of one epoch of ``recipes/steer_tiny.yaml`` (gates and a LoRA adapter on tiny:llama)."""
    root = _steer(tmp_path_factory.mktemp("steer"), "--trainer.max_epochs", "1")
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint


def test_a_checkpoint_cannot_replace_frozen_base_weights(tmp_path, one_epoch):
    from ipg_lightning.steering.learned import SteeringCheckpointError, load_steering_checkpoint

    checkpoint = torch.load(one_epoch, weights_only=True)
    checkpoint["state_dict"]["lm.base_model.model.lm_head.weight"] = torch.zeros(100, 64)
    planted = tmp_path / "planted.ckpt"
    torch.save(checkpoint, planted)
    refused = r"holds tensors that are not trained gates, vectors, adapter or slices of this run \(lm.base_model.model.lm_head.weight\)"
    with pytest.raises(SteeringCheckpointError, match=refused):
        load_steering_checkpoint(planted)
    with pytest.raises(SteeringCheckpointError, match=refused):
        run(["export", "--steering_checkpoint", str(planted), "--output_dir", str(tmp_path / "export")])
    with pytest.raises(SteeringCheckpointError, match=refused):  # Lightning's own resume path
        _steer(tmp_path / "resumed", "--trainer.max_epochs", "2", "--ckpt_path", str(planted))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("dropped", ["gates.", "lora_", ""], ids=["gates", "lora", "everything"])
def test_a_checkpoint_missing_what_it_trained_is_refused_not_run_untrained(tmp_path, one_epoch, dropped):
    from ipg_lightning.steering.learned import SteeringCheckpointError

    checkpoint = torch.load(one_epoch, weights_only=True)
    checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if dropped not in key}
    torch.save(checkpoint, tmp_path / "partial.ckpt")
    with pytest.raises(SteeringCheckpointError, match=r"partial.ckpt lacks trained tensors of this run"):
        run(["evaluate", "--steering_checkpoint", str(tmp_path / "partial.ckpt"), "--output_dir", str(tmp_path / "eval"), *QUICK])
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_naming_a_component_the_model_lacks_is_named(tmp_path, one_epoch):
    checkpoint = torch.load(one_epoch, weights_only=True)
    checkpoint["ipg_steering"]["components"][0] = "blocks.1.mlp.hook_post[99999]"
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"odd.ckpt: 'blocks.1.mlp.hook_post\[99999\]' is out of range"):
        run(["evaluate", "--steering_checkpoint", str(tmp_path / "odd.ckpt"), "--output_dir", str(tmp_path / "eval"), *QUICK])


def test_a_checkpoint_with_settings_of_the_wrong_kind_is_named(tmp_path, one_epoch):
    checkpoint = torch.load(one_epoch, weights_only=True)
    checkpoint["hyper_parameters"]["learning_rate"] = "fast"
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"odd.ckpt: its hyper_parameters are not valid settings"):
        run(["evaluate", "--steering_checkpoint", str(tmp_path / "odd.ckpt"), "--output_dir", str(tmp_path / "eval"), *QUICK])


def test_resuming_with_another_learning_rate_is_refused_before_loading(tmp_path, monkeypatch, one_epoch):
    _no_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"changed optimizer settings \(learning_rate 0.05 -> 0.5\)"):
        _steer(tmp_path, "--trainer.max_epochs", "2", "--model.learning_rate", "0.5", "--ckpt_path", str(one_epoch))
    assert not list(tmp_path.rglob("hparams.yaml"))  # the value that would not be used is not recorded


def test_resuming_a_finished_run_says_nothing_was_trained(tmp_path, capsys, one_epoch):
    _steer(tmp_path, "--trainer.max_epochs", "1", "--ckpt_path", str(one_epoch))
    printed = capsys.readouterr().out
    assert "nothing was trained" in printed and "raise --trainer.max_epochs" in printed and "trained gates" not in printed


# ----------------------------------------------------------------------------- 6-8. the explorer and identities
@pytest.fixture(scope="module")
def kept_report(tmp_path_factory):
    """A report of tiny:llama that kept its trajectories (``recipes/attribute_tiny.yaml``, 2 prompts)."""
    report = tmp_path_factory.mktemp("explore") / "report"
    settings = ["--model.keep_trajectories", "true", "--data.num_val", "2", "--model.sampling.max_new_tokens", "8"]
    run(["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), *settings, "--model.output_dir", str(report)])
    return report


def _evaluate(output, model_path):
    run(["evaluate", "--model_path", model_path, "--output_dir", str(output), *QUICK])
    return output


def test_explore_refuses_evaluations_of_another_model(tmp_path, monkeypatch, kept_report, tiny_model):
    from ipg_lightning.explorer import read_evaluations
    from ipg_lightning.model.identity import ModelMismatchError

    identity = json.loads((kept_report / "attribution.json").read_text())["model_identity"]
    other_architecture = _evaluate(tmp_path / "qwen2", "tiny:qwen2")
    tiny_model("llama").save_pretrained(tmp_path / "copy")  # the same architecture, under another name
    other_name = tmp_path / "other_name"
    summary = json.loads((_evaluate(tmp_path / "base", "tiny:llama") / "metrics.json").read_text())
    other_name.mkdir()
    (other_name / "metrics.json").write_text(json.dumps({**summary, "model_identity": {**summary["model_identity"], "name": str(tmp_path / "copy")}}))
    _no_loading(monkeypatch)
    with pytest.raises(ModelMismatchError, match=r"the model of the evaluation .*qwen2 is tiny:qwen2"):
        run(["explore", str(kept_report), "--evaluations", f'["{other_architecture}"]', "--output", str(tmp_path / "page.html")])
    with pytest.raises(ModelMismatchError, match=r"measured .*copy, but the report was computed on tiny:llama"):
        read_evaluations([other_name], identity)
    assert read_evaluations([tmp_path / "base"], identity).base == summary["metrics"]  # the report's own model passes
    assert not (tmp_path / "page.html").exists()


def test_artefacts_without_a_recorded_identity_are_named_as_unchecked(tmp_path, caplog, kept_report):
    from ipg_lightning.explorer import read_evaluations
    from ipg_lightning.steering import ComponentSelection

    identity = json.loads((kept_report / "attribution.json").read_text())["model_identity"]
    summary = json.loads((_evaluate(tmp_path / "base", "tiny:llama") / "metrics.json").read_text())
    del summary["model_identity"]
    (tmp_path / "base" / "metrics.json").write_text(json.dumps(summary))
    read_evaluations([tmp_path / "base"], identity)
    old = tmp_path / "old_report"
    shutil.copytree(kept_report, old)
    metadata = json.loads((old / "attribution.json").read_text())
    del metadata["model_identity"]
    (old / "attribution.json").write_text(json.dumps(metadata))
    run(["evaluate", "--selection.report", str(old), "--selection.k", "2", "--output_dir", str(tmp_path / "steered"), *QUICK])
    lines = [record.getMessage() for record in caplog.records if "records no model identity" in record.getMessage()]
    assert len(lines) == 2 and "cannot be checked" in lines[0] and str(old) in lines[1]
    assert ComponentSelection(report=str(old), k=2).resolve()  # still usable: its sizes are checked


def _edited(report, tmp_path, edit, digest=False):
    """A copy of ``report`` whose trajectories.json was edited by hand (and, with ``digest``, its recorded digest too)."""
    copy = tmp_path / "edited"
    shutil.copytree(report, copy)
    kept = json.loads((copy / "trajectories.json").read_text())
    edit(kept)
    (copy / "trajectories.json").write_text(json.dumps(kept))
    if not digest:
        return copy
    metadata = json.loads((copy / "attribution.json").read_text())
    metadata.pop("trajectories_sha256")
    (copy / "attribution.json").write_text(json.dumps(metadata))
    return copy


def _explore(report, tmp_path, *flags):
    run(["explore", str(report), "--output", str(tmp_path / "page.html"), "--progress", "false", *flags])


def _empty_completions(kept):
    for row in kept["rows"]:
        row["completion_ids"], row["completion"] = [], ""


def _too_long(kept):
    kept["rows"][0]["completion_ids"] = [5] * 3000


def test_hand_edited_trajectories_are_refused_not_replayed(tmp_path, kept_report):
    with pytest.raises(ValueError, match=r"trajectories.json was changed after its report was written"):
        _explore(_edited(kept_report, tmp_path, _empty_completions), tmp_path)
    assert not (tmp_path / "page.html").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (_too_long, r"Kept trajectory 0 is \d+ tokens long, longer than the model's context of 512"),
        (
            lambda kept: kept["rows"][1]["completion_ids"].append(10**6),
            r"Kept trajectory 1 has token id 1000000, but the model's vocabulary has 128 tokens",
        ),
        (lambda kept: kept.update(pad_token_id=10**9), r"pad with token 1000000000, which the model \(vocabulary 128\) does not have"),
        (lambda kept: kept.update(rows=[]), r"not every prompt has its num_samples = 4 trajectories"),
        (lambda kept: kept.update(num_samples="4"), r"num_samples or pad_token_id is not a whole number"),
        (lambda kept: kept["prompts"][0].update(prompt_ids=[]), r"prompt_ids are not token ids"),
        (_empty_completions, r"completion_ids are not token ids, or none"),
        (lambda kept: kept["rows"][0].update(reasoning_tokens=-5), r"reasoning_tokens, reward or advantage is not a number"),
        (lambda kept: kept.update(prompts=kept["prompts"][:1], rows=[r for r in kept["rows"] if r["prompt"] == 0]), r"holds 1 prompts and 4"),
        (lambda kept: kept["rows"][0].update(advantage="high"), r"reward or advantage is not a number"),
    ],
    ids=["longer-than-context", "token-id", "pad-id", "no-rows", "num-samples-text", "empty-prompt", "empty-completions", "negative-length", "fewer"]
    + ["string-advantage"],
)
def test_an_older_report_is_checked_against_the_model_before_replay(tmp_path, kept_report, edit, message):
    with pytest.raises(ValueError, match=message):
        _explore(_edited(kept_report, tmp_path, edit, digest=True), tmp_path)
    assert not (tmp_path / "page.html").exists()


def test_explore_checks_the_device_and_the_sizes_before_replay(tmp_path, monkeypatch, kept_report):
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"):
        _explore(kept_report, tmp_path, "--device", "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda: this machine has 0 CUDA devices"):
            _explore(kept_report, tmp_path, "--device", "cuda")
    with pytest.raises(ValueError, match=r"sites differ in size from the report's, .*\(64 in the report, \d+ here\)"):
        _explore(kept_report, tmp_path, "--model_path", TINY_REASONER_PATH, "--allow_other_model", "true")


def test_a_page_is_never_added_inside_an_output_that_would_then_refuse_overwrite(tmp_path, kept_report):
    with pytest.raises(ValueError, match=r"Refusing to write .*report/page.html inside .*report, an output of ipg_lightning"):
        run(["explore", str(kept_report), "--output", str(kept_report / "page.html"), "--progress", "false"])
    assert not (kept_report / "page.html").exists()


# ----------------------------------------------------------------------------- raw or misleading messages
def test_a_weight_slice_of_a_component_the_model_lacks_is_named(tmp_path):
    flags = ["--model.weight_slices", "true", "--model.lora", "null", "--model.selection.components", '["blocks.1.mlp.hook_post[999]"]']
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.hook_post\[999\]' is out of range: blocks.1.mlp.hook_post has 64 components"):
        _steer(tmp_path, *flags)


@pytest.mark.parametrize("command", ["evaluate", "train-sae", "train-reasoner"])
def test_a_null_output_directory_is_named_before_any_work(tmp_path, monkeypatch, command):
    _no_loading(monkeypatch)
    (tmp_path / "null.yaml").write_text("output_dir: ~\n")
    with pytest.raises(ValueError, match=r"The output directory is not set \(it is None, e.g. `output_dir: ~` in a YAML file\)"):
        run([command, "--config", str(tmp_path / "null.yaml")])
    with pytest.raises(ValueError, match=r"--model.output_dir is not set \(null\): the report would be computed and then lost"):
        run(["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.output_dir", "null"])


def test_a_reward_that_returns_text_is_named():
    from ipg_lightning.rewards.functions import Completion, score_completions

    def verdict(completion):
        return "correct"

    with pytest.raises(ValueError, match=r"The reward verdict returned 'correct' \(str\) for completion 0: rewards must be numbers"):
        score_completions(verdict, [Completion("", "4", 1)])


def test_random_bytes_are_not_called_a_checkpoint_that_can_run_code(tmp_path):
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ValueError, match=r"noise.ckpt cannot be read as a checkpoint: it is not a torch.save archive") as caught:
        run(["evaluate", "--steering_checkpoint", str(tmp_path / "noise.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert "run code" not in str(caught.value)


def test_a_missing_required_option_is_named_as_an_option(capsys):
    from ipg_lightning.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["export"])
    assert exited.value.code == 2 and "ipg export: error: missing required option: --output_dir" in capsys.readouterr().err


def test_ctrl_c_during_training_exits_130_with_the_interrupted_message(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    command = [str(Path(sys.executable).parent / "ipg"), "steer", "--config", str(RECIPES / "steer_tiny.yaml"), "--trainer.max_epochs", "100000"]
    command += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("hparams.yaml")) and time.monotonic() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-1500:]
    assert stderr.strip().splitlines()[-1] == "ipg steer: interrupted; no output was written under its final name"


def test_ctrl_c_while_a_command_is_still_importing_exits_130_and_writes_nothing(tmp_path):
    """The handler is in place before the command's module (torch, transformers) is imported, so no library swallows it."""
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "export"
    command = [str(Path(sys.executable).parent / "ipg"), "export", "--model_path", "tiny:llama", "--output_dir", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch alone takes longer
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-1500:]
    assert stderr.strip().splitlines()[-1] == "ipg export: interrupted; no output was written under its final name"
    assert not output.exists() and not list(tmp_path.iterdir())


def test_a_folder_that_is_not_a_model_is_not_called_a_model_without_a_tokenizer(tmp_path):
    from ipg_lightning.model.loading import ModelLoadError, load_model_and_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    for folder in ("/etc", str(tmp_path)):
        with pytest.raises(ModelLoadError, match=rf"{folder} is not a Hugging Face model directory: it has no config.json"):
            load_model_and_tokenizer(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda summary: summary["metrics"].update(accuracy="high"), r"metric accuracy is 'high', not a number >= 0"),
        (lambda summary: summary["metrics"].update(accuracy=7.5), r"metric accuracy is 7.5, but it is a share of the completions"),
        (lambda summary: summary["metrics"].update({"pass@4": 1.5}), r"metric pass@4 is 1.5, but it is a share of the completions"),
        (lambda summary: summary.update(model_identity="tiny:llama"), r"model_identity must be objects"),
        (lambda summary: summary["steering"].update(kind="fixed", components="blocks.0", gamma=0), r"steering.components must be a list"),
        (lambda summary: summary["steering"].update(kind="fixed", components=["blocks.0.hook_mlp_out"], gamma="zero"), r"gamma is 'zero'"),
    ],
    ids=["text-accuracy", "accuracy-above-1", "pass-at-k-above-1", "identity-text", "components-text", "gamma-text"],
)
def test_tampered_evaluations_are_refused_by_the_explorer(tmp_path, kept_report, edit, message):
    from ipg_lightning.explorer import read_evaluations

    summary = json.loads((_evaluate(tmp_path / "base", "tiny:llama") / "metrics.json").read_text())
    edit(summary)
    (tmp_path / "base" / "metrics.json").write_text(json.dumps(summary))
    identity = json.loads((kept_report / "attribution.json").read_text())["model_identity"]
    with pytest.raises(ValueError, match=message):
        read_evaluations([tmp_path / "base"], identity)


def test_a_report_that_names_no_model_asks_for_one(tmp_path, kept_report):
    copy = tmp_path / "report"
    shutil.copytree(kept_report, copy)
    metadata = json.loads((copy / "attribution.json").read_text())
    del metadata["model"]
    (copy / "attribution.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"does not say which model it was computed on: give it with --model_path"):
        _explore(copy, tmp_path)


def test_lora_settings_that_cannot_train_are_refused():
    from ipg_lightning.steering.finetune.lora import LoraSettings

    with pytest.raises(ValueError, match=r"lora.alpha must be > 0 \(the adapter's scale is alpha / r\), got -4"):
        LoraSettings(alpha=-4)
    with pytest.raises(ValueError, match=r"lora.dropout must be in \[0, 1\), got 1.5"):
        LoraSettings(dropout=1.5)
