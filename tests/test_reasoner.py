import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ArithmeticChainTask, ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.scoring import completion_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig, teacher_forced_trajectories
from ipg_lightning.steering import gates_for_components
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_RL_PATH, TINY_REASONER_TASK, ReasonerTraining, reasoner_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(TINY_REASONER_PATH)


def test_training_recipe_uses_the_task_the_demo_assumes():
    recipe = yaml.safe_load((ROOT / "recipes" / "train_tiny_reasoner.yaml").read_text())
    assert ArithmeticChainTask(**recipe["data"]["synthetic_task"]) == TINY_REASONER_TASK
    assert recipe["data"]["seed"] == TINY_REASONER_TASK.seed == 0


def test_chat_template_shows_only_the_question():
    tokenizer = reasoner_tokenizer()
    messages = [{"role": "user", "content": "Solve the problem step by step.\n\nStart with 3. Add 4. What is the result?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "Q: Start with 3. Add 4. What is the result?\nA:"


def test_a_few_training_steps_lower_the_solution_loss():
    import lightning as L

    data = ReasoningDataModule(num_train=64, num_val=4, num_test=4, batch_size=16, synthetic_task=TINY_REASONER_TASK)
    module = ReasonerTraining(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, warmup_steps=2, learning_rate=1e-2)
    data.connect(module.tokenizer)
    batch = next(iter(data.test_dataloader()))
    trajectories = teacher_forced_trajectories(module.tokenizer, batch["prompt"], batch["solution"])

    def solution_nll():
        with torch.no_grad():
            log_probs = completion_log_probs(module.lm, trajectories)
        return -log_probs.sum().item() / trajectories.num_completion_tokens

    before = solution_nll()
    L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=data)
    assert solution_nll() < 0.6 * before  # held-out problems: it learned the format, not the batch


@pytest.mark.skipif(not CHECKPOINT.is_dir(), reason="the shipped reasoner is not in this checkout")
def test_shipped_reasoner_loads_offline_with_a_card_and_room_to_move():
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    assert model.config.model_type == "llama" and tokenizer.chat_template
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) < 20 * 2**20
    measured = json.loads((CHECKPOINT / "metrics.json").read_text())["held_out"]
    assert 0.1 < measured["accuracy"] < 0.95  # well below 100 %: steering can move it either way
    assert measured["reasoning_length_max"] > 1.3 * measured["reasoning_length_min"]  # lengths vary
    card = (CHECKPOINT / "README.md").read_text()
    assert "ipg train-reasoner --config recipes/train_tiny_reasoner.yaml" in card and "seed 0" in card
    assert f"{measured['accuracy']:.3f}" in card


def _held_out(tokenizer, num_test: int, num_val: int = 16) -> ReasoningDataModule:
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_train=num_val, num_val=num_val, num_test=num_test, batch_size=16, seed=0)
    data.connect(tokenizer)
    return data


@pytest.mark.skipif(not CHECKPOINT.is_dir(), reason="the shipped reasoner is not in this checkout")
def test_shipped_reasoner_measures_what_its_card_says():
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    data = _held_out(tokenizer, num_test=128)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=64)
    measured = evaluate_generations(model, tokenizer, data.test_dataloader(), greedy).metrics
    card = json.loads((CHECKPOINT / "metrics.json").read_text())["held_out"]
    assert abs(measured["accuracy"] - card["accuracy"]) < 0.08  # 128 of the card's 512 problems
    assert measured["answer_rate"] == 1.0


@pytest.mark.skipif(not CHECKPOINT.is_dir(), reason="the shipped reasoner is not in this checkout")
def test_ipg_length_components_turn_reasoning_length_down_and_up():
    """The demo's claim, on fewer problems: the top IPG length neurons of the last block control how
    often the reasoner re-checks its steps, so suppressing them shortens reasoning and amplifying
    them lengthens it, with the same sampling seeds in every condition."""
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    data = _held_out(tokenizer, num_test=32)
    module = IPGAttribution.for_model(
        model,
        tokenizer,
        reward="reasoning_length",
        families=["mlp_neuron"],
        layers=[3],
        steps=8,
        rule="gauss_legendre",
        sampling=SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64, seed=0),
    )
    report = run_attribution(module, data, enable_progress_bar=False)
    assert abs(report.metadata.completeness.relative_residual) < 0.05
    top = report.select(k=4)
    sampled = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64)

    def mean_length(gamma: float) -> float:
        gates = gates_for_components(model, top, gamma)
        return evaluate_generations(model, tokenizer, data.test_dataloader(), sampled, gates).metrics["reasoning_length_mean"]

    base, suppressed, amplified = mean_length(1.0), mean_length(0.0), mean_length(2.0)
    assert suppressed < base - 3 and amplified > base + 3, (suppressed, base, amplified)


RL_CHECKPOINT = Path(TINY_REASONER_RL_PATH)


@pytest.mark.skipif(not RL_CHECKPOINT.is_dir(), reason="the RL testbed reasoner is not in this checkout")
def test_rl_reasoner_measures_what_its_card_says_and_rechecks_less_than_the_sft_one():
    card = json.loads((RL_CHECKPOINT / "metrics.json").read_text())
    readme = (RL_CHECKPOINT / "README.md").read_text()
    assert "ipg steer --config recipes/steer_tiny_reasoner_rl.yaml" in readme
    assert f"{card['held_out']['accuracy']:.3f}" in readme and f"{card['sft_held_out']['accuracy']:.3f}" in readme
    rl, tokenizer = load_model_and_tokenizer(TINY_REASONER_RL_PATH)
    sft, _ = load_model_and_tokenizer(TINY_REASONER_PATH)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(rl.parameters(), sft.parameters(), strict=True))  # merged, not a copy
    data = _held_out(tokenizer, num_test=128)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128)
    measured = evaluate_generations(rl, tokenizer, data.test_dataloader(), greedy).metrics
    assert abs(measured["accuracy"] - card["held_out"]["accuracy"]) < 0.08  # 128 of the card's 512 problems
    # the card's claim: sampled, the RL model re-checks its steps far less often than the SFT model
    sampled = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=128, seed=0)
    few = _held_out(tokenizer, num_test=64)
    rechecks = {
        name: evaluate_generations(model, tokenizer, few.test_dataloader(), sampled).metrics["reflection_rate"]
        for name, model in (("rl", rl), ("sft", sft))
    }
    assert rechecks["rl"] < 0.1 < 0.3 < rechecks["sft"]
