"""Training a TopK SAE with Lightning: it learns to reconstruct, keeps its decoder at unit norm, its
metrics equal direct computations, it runs under DDP in sync, and the shipped SAE meets its card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipg_lightning.cli.main import run
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import attach_sae, load_sae
from ipg_lightning.sae.metrics import DeadFeatureFraction, FractionOfVarianceUnexplained
from ipg_lightning.sae.training import SAETraining
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK

SHIPPED_SAE = Path(TINY_REASONER_PATH).with_name("tiny-reasoner-sae")


def _data(num_train=32, num_val=8, batch_size=8):
    return ReasoningDataModule(
        num_train=num_train, num_val=num_val, num_test=0, batch_size=batch_size, template=PromptTemplate(use_chat_template=False)
    )


def _site_activations(model, module, data):
    """The site's activations on the texts the module reads (prompt and EOS), taken by a hook of the test's own."""
    seen = []
    block = model.model.layers[1]
    handle = block.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        for batch in data.val_dataloader():
            inputs = module.texts(batch).padded()
            with torch.no_grad():
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
            seen[-1] = seen[-1][inputs["attention_mask"].bool()]
    finally:
        handle.remove()
    return torch.cat(seen)


def test_fit_learns_a_reconstruction_with_unit_norm_decoder_rows(tiny_llama, tokenizer, quiet_trainer):
    module = SAETraining.for_model(tiny_llama, tokenizer, hook_name="blocks.1.hook_resid_post", expansion=4, k=4, learning_rate=0.01)
    data = _data()
    data.connect(tokenizer)
    quiet_trainer(max_epochs=8).fit(module, datamodule=data)
    z = _site_activations(tiny_llama, module, data)
    with torch.no_grad():
        fvu = ((z - module.sae(z)) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()
        features = module.sae.encode(z)
    assert fvu < 0.35  # a random k=4 SAE explains nothing (FVU >= 1); the trained one most of the variance
    assert (features != 0).sum(-1).max() <= 4
    assert torch.allclose(module.sae.W_dec.norm(dim=-1), torch.ones(module.sae.d_sae), atol=1e-5)
    results = quiet_trainer(limit_val_batches=None).validate(module, datamodule=data, verbose=False)[0]
    assert results["val/fvu"] == pytest.approx(float(fvu), rel=1e-3)  # the torchmetric equals the direct computation
    assert results["val/l0"] == pytest.approx(float((features != 0).sum(-1).float().mean()), rel=1e-4)


def test_metrics_equal_direct_computations_over_several_updates():
    generator = torch.Generator().manual_seed(0)
    z, z_hat = torch.randn(50, 6, generator=generator) + 3, torch.randn(50, 6, generator=generator)
    fvu = FractionOfVarianceUnexplained(6)
    fvu.update(z[:20], z_hat[:20])
    fvu.update(z[20:], z_hat[20:])
    assert float(fvu.compute()) == pytest.approx(float(((z - z_hat) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()), rel=1e-5)
    dead = DeadFeatureFraction(4)
    dead.update(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    dead.update(torch.tensor([[0.0, 0.0, 2.0, 0.0]]))
    assert float(dead.compute()) == 0.5


def test_train_sae_command_saves_an_sae_that_loads_back_equal(tmp_path):
    output = tmp_path / "sae"
    common = ["--model.model_path", "tiny:llama", "--model.hook_name", "blocks.1.hook_mlp_out", "--model.expansion", "2", "--model.k", "3"]
    data = [
        "--data.num_train",
        "16",
        "--data.num_val",
        "4",
        "--data.num_test",
        "0",
        "--data.batch_size",
        "4",
        "--data.template.use_chat_template",
        "false",
    ]
    trainer = [
        "--trainer.max_epochs",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    run(["train-sae", *common, *data, *trainer, "--output_dir", str(output)])
    sae = load_sae(output)
    card = json.loads((output / "sae_card.json").read_text())
    assert (sae.hook_name, sae.d_sae, sae.k, sae.normalization) == ("blocks.1.hook_mlp_out", 64, 3, "none")
    metrics = card["metrics"]
    assert set(metrics) == {"fvu", "l0", "dead_fraction", "loss_increase", "ablation_loss_increase", "loss_recovered"} and card["steps"] == 4
    if metrics["ablation_loss_increase"] > 0:  # measured against replacing the activation by its mean
        assert metrics["loss_recovered"] == pytest.approx(1 - metrics["loss_increase"] / metrics["ablation_loss_increase"], abs=1e-4)
        assert card["warnings"] == []
    else:  # the loss does not depend on the site on these tokens: no number, and a warning that says so
        assert metrics["loss_recovered"] is None and "says nothing about this SAE" in card["warnings"][0]
    with pytest.raises(FileExistsError):  # refused before any training
        run(["train-sae", *common, *data, *trainer, "--output_dir", str(output)])


def test_two_ddp_processes_keep_one_sae(tmp_path):
    script = Path(__file__).with_name("ddp_sae.py")
    subprocess.run(
        [sys.executable, str(script), "2", str(tmp_path / "sae")],
        check=True,
        timeout=300,
        capture_output=True,
        env={**os.environ, "PL_DISABLE_FORK": "1"},
    )
    first, second = (torch.load(tmp_path / f"sae.{rank}") for rank in (0, 1))
    for key, value in first.items():  # data-dependent initialisation and every step agree across ranks
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)
    assert first["W_dec"].abs().sum() > 0 and float(first["input_scale"]) != 1.0


def test_the_shipped_sae_meets_its_card(tokenizer):
    card = json.loads((SHIPPED_SAE / "sae_card.json").read_text())
    sae = load_sae(SHIPPED_SAE)
    assert card["metrics"]["fvu"] < 0.15 and card["metrics"]["dead_fraction"] < 0.1  # the recipe's bar
    settings = card["settings"]
    module = SAETraining(
        model_path=TINY_REASONER_PATH, hook_name=sae.hook_name, expansion=settings["expansion"], k=sae.k, traces=SamplingConfig(**settings["traces"])
    )
    module.load_model()
    module.sae = sae
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_train=0, num_val=128, num_test=0, batch_size=64, seed=0)
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    measured = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert measured["val/fvu"] == pytest.approx(card["metrics"]["fvu"], abs=0.01)
    assert measured["val/dead_fraction"] == pytest.approx(card["metrics"]["dead_fraction"], abs=0.01)
    attach_sae(module.lm, sae)  # and it splices into the model it was trained for


def test_the_papers_sae_recipes_run_on_a_tiny_qwen2_in_bfloat16(tmp_path):
    """The Qwen2.5-Math recipes' code path (bf16 weights, sampled traces, then attribution over the SAE's
    features) on a tiny random model of the same architecture (built-in problems: the tiny model's
    512-token context is shorter than reasoning-gym's character-tokenised prompts)."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    small = [
        "--data.source",
        "synthetic",
        "--data.num_val",
        "2",
        "--data.batch_size",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    sae_dir = tmp_path / "sae"
    run(
        [
            "train-sae",
            "--config",
            str(recipes / "train_sae_qwen_math_gsm8k.yaml"),
            "--model.model_path",
            "tiny:qwen2",
            "--model.hook_name",
            "blocks.1.hook_resid_post",
        ]
        + [
            "--model.expansion",
            "2",
            "--model.k",
            "4",
            "--model.traces.max_new_tokens",
            "8",
            "--data.num_train",
            "4",
            "--trainer.enable_checkpointing",
            "false",
        ]
        + [*small, "--trainer.default_root_dir", str(tmp_path), "--output_dir", str(sae_dir)]
    )
    assert load_sae(sae_dir).hook_name == "blocks.1.hook_resid_post"
    report = tmp_path / "report"
    run(
        ["attribute", "--config", str(recipes / "attribute_qwen_math_gsm8k_sae.yaml"), "--model.model_path", "tiny:qwen2", "--model.layers", "[1]"]
        + ["--model.saes", f"[{sae_dir}]", "--model.steps", "2", "--model.sampling.max_new_tokens", "8", "--model.sampling.temperature", "1.0"]
        + [
            "--model.reward",
            "ipg_lightning.rewards:answer_present",
            "--model.method",
            "grad_x_act",
            "--data.num_test",
            "0",
            *small,
            "--model.output_dir",
            str(report),
        ]
    )
    scores = json.loads((report / "attribution.json").read_text())
    assert scores["saes"] == {"blocks.1.hook_resid_post.sae": str(sae_dir.resolve())} and scores["config"]["dtype"] == "bfloat16"
