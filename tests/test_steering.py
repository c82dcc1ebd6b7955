import lightning as L
import pytest
import torch

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.rollout.scoring import completion_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig, teacher_forced_trajectories
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.steering.learned import GateSteering, LoraSettings, load_steering_checkpoint
from ipg_lightning.steering.vector_training import VectorTraining
from ipg_lightning.zoo.tiny import tiny_causal_lm, tiny_tokenizer

SELECTED = ("blocks.1.mlp.hook_post[3]", "blocks.1.mlp.hook_post[7]", "blocks.0.attn.hook_z[1]")
INPUT = torch.tensor([[5, 17, 30, 42, 8]])


def _data(num_train=4, batch_size=4, **kwargs):
    return ReasoningDataModule(
        num_train=num_train, num_val=2, num_test=2, batch_size=batch_size, template=PromptTemplate(use_chat_template=False), **kwargs
    )


def _trainer(tmp_path, **kwargs):
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        max_epochs=2,
    )
    return L.Trainer(**{**settings, **kwargs})


def _steering(model=None, seed=0, **kwargs):
    settings = dict(
        selection=ComponentSelection(components=SELECTED),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, num_samples=4, seed=seed),
        learning_rate=0.1,
    )
    model = model or tiny_causal_lm("llama")
    return GateSteering.for_model(model, tiny_tokenizer(), **{**settings, **kwargs})


def test_fixed_steering_gates_set_exactly_the_named_components(tiny_model):
    model = tiny_model("qwen3")
    gates = gates_for_components(model, ["blocks.1.attn.hook_z[2]", "blocks.0.hook_resid_post[4]"], 0.0)
    assert set(gates.sites) == {"blocks.1.attn.hook_z", "blocks.0.hook_resid_post"}
    assert gates.gate("blocks.1.attn.hook_z").tolist() == [1.0, 1.0, 0.0, 1.0]
    assert gates.flat_values().eq(0).sum() == 2
    per_component = gates_for_components(
        model, ["blocks.1.attn.hook_z[0]", "blocks.1.attn.hook_z[3]"], {"blocks.1.attn.hook_z[0]": 1.5, "blocks.1.attn.hook_z[3]": 0.5}
    )
    assert per_component.gate("blocks.1.attn.hook_z").tolist() == [1.5, 1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="Unknown site name 'blocks.1.attn.hook_q'"):
        gates_for_components(model, ["blocks.1.attn.hook_q[0]"])
    with pytest.raises(ValueError, match="must be finite, got nan"):
        gates_for_components(model, ["blocks.1.attn.hook_z[0]"], float("nan"))


def test_selection_from_a_report(tmp_path):
    sites = {"blocks.0.attn.hook_z": {"family": "attn_head", "layer": 0, "size": 4}}
    AttributionReport({"blocks.0.attn.hook_z": torch.tensor([0.1, -3.0, 2.0, 0.5])}, sites).save(tmp_path / "r")
    assert ComponentSelection(report=str(tmp_path / "r"), k=2).resolve() == ["blocks.0.attn.hook_z[2]", "blocks.0.attn.hook_z[3]"]
    assert ComponentSelection(report=str(tmp_path / "r"), k=1, signed=False).resolve() == ["blocks.0.attn.hook_z[1]"]
    with pytest.raises(ValueError, match="either from a report"):
        ComponentSelection()
    with pytest.raises(ValueError, match="exactly one of k or fraction"):
        ComponentSelection(report=str(tmp_path / "r")).check_count()
    with pytest.raises(ValueError, match="exactly one of k or fraction"):
        ComponentSelection(report=str(tmp_path / "r"), k=2, fraction=0.5)


def test_training_moves_only_selected_gates_and_checkpoints_only_what_trained(tmp_path):
    module = _steering(lora=LoraSettings(r=2, target_modules=["q_proj"]))
    base_weights = {k: v.clone() for k, v in module.lm.state_dict().items() if "lora" not in k}
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_data())
    mlp = module.gates.gate("blocks.1.mlp.hook_post").detach()
    heads = module.gates.gate("blocks.0.attn.hook_z").detach()
    assert mlp[3] != 1.0 and mlp[7] != 1.0 and heads[1] != 1.0
    assert mlp.eq(1.0).sum() == 62 and heads.eq(1.0).sum() == 3  # every other gate held at 1
    for key, value in module.lm.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, base_weights[key]), key
    trainer.save_checkpoint(tmp_path / "gates.ckpt")
    checkpoint = torch.load(tmp_path / "gates.ckpt", weights_only=False)
    assert all(("lora_" in key) or key.startswith("gates.") for key in checkpoint["state_dict"])
    assert len(checkpoint["state_dict"]) == 6  # 2 gate vectors + lora A/B in 2 layers
    assert checkpoint["ipg_steering"]["components"] == list(SELECTED)
    assert "optimizer_states" in checkpoint
    with pytest.raises(ValueError, match="never saved under a path: pass the model"):
        load_steering_checkpoint(tmp_path / "gates.ckpt")  # trained on a model handed over in memory
    restored = load_steering_checkpoint(tmp_path / "gates.ckpt", model="tiny:llama")
    assert torch.equal(restored.gates.gate("blocks.1.mlp.hook_post"), module.gates.gate("blocks.1.mlp.hook_post"))
    with restored.gates.attach(restored.lm), module.gates.attach(module.lm):
        torch.testing.assert_close(restored.lm(INPUT).logits, module.lm(INPUT).logits)


FINE_TUNES = {"lora": dict(lora=LoraSettings(r=2, target_modules=["q_proj"])), "weight_slices": dict(weight_slices=True)}


@pytest.mark.parametrize("fine_tune", FINE_TUNES)
def test_resuming_from_a_checkpoint_reaches_the_uninterrupted_result(tmp_path, fine_tune):
    uninterrupted = _steering(**FINE_TUNES[fine_tune])
    _trainer(tmp_path / "a", max_epochs=3).fit(uninterrupted, datamodule=_data(num_train=4, batch_size=2))

    first = _steering(**FINE_TUNES[fine_tune])
    trainer = _trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, datamodule=_data(num_train=4, batch_size=2))
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = _steering(**FINE_TUNES[fine_tune])
    trainer = _trainer(tmp_path / "c", max_epochs=3)
    trainer.fit(resumed, datamodule=_data(num_train=4, batch_size=2), ckpt_path=tmp_path / "epoch1.ckpt")
    expected, actual = uninterrupted.trainable_state(), resumed.trainable_state()
    assert set(expected) == set(actual)
    assert any("lora_" in key or key.endswith(".delta") for key in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(first.trainable_state()["gates.values.blocks__1__mlp__hook_post"], expected["gates.values.blocks__1__mlp__hook_post"])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = load_steering_checkpoint(tmp_path / "last.ckpt", model="tiny:llama")
    with torch.no_grad(), restored.gates.attach(restored.lm), resumed.gates.attach(resumed.lm):
        torch.testing.assert_close(restored.lm(INPUT).logits, resumed.lm(INPUT).logits)


def test_policy_gradient_raises_the_gate_of_a_neuron_that_drives_the_reward(tmp_path):
    from test_attribution import _planted_model, starts_with_digit

    model, tokenizer, _ = _planted_model(neuron=5, target_p=0.3)
    module = GateSteering.for_model(
        model,
        tokenizer,
        selection=ComponentSelection(components=("blocks.1.mlp.hook_post[5]",)),
        reward=starts_with_digit,
        sampling=SamplingConfig(max_new_tokens=1, num_samples=8),
        learning_rate=0.1,
    )
    _trainer(tmp_path, max_epochs=4).fit(module, datamodule=_data(num_train=8, batch_size=4))
    assert module.gates.gate("blocks.1.mlp.hook_post")[5].item() > 1.2


def test_gate_penalty_keeps_gates_nearer_one_and_kl_is_non_negative(tmp_path):
    free = _steering(seed=1)
    _trainer(tmp_path / "free").fit(free, datamodule=_data())
    held = _steering(seed=1, gate_penalty=50.0, kl_coef=1.0)
    trainer = _trainer(tmp_path / "held")
    trainer.fit(held, datamodule=_data())
    assert held.gates.squared_deviation().item() < free.gates.squared_deviation().item()
    assert trainer.callback_metrics["train/kl"].item() >= 0


def test_supervised_objective_raises_the_likelihood_of_reference_traces(tmp_path):
    module = _steering(objective="supervised", selection=ComponentSelection(components=tuple(f"blocks.1.mlp.hook_post[{i}]" for i in range(64))))
    data = _data(num_train=4, batch_size=4)
    data.connect(module.tokenizer)
    batch = next(iter(data.train_dataloader()))
    trajectories = teacher_forced_trajectories(module.tokenizer, batch["prompt"], batch["solution"])

    def reference_log_likelihood():
        with torch.no_grad(), module.gates.attach(module.lm):
            return completion_log_probs(module.lm, trajectories).sum().item()

    before = reference_log_likelihood()
    _trainer(tmp_path, max_epochs=5).fit(module, datamodule=data)
    assert reference_log_likelihood() > before + 1.0


def test_validation_metrics_go_to_a_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = _steering()
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=None, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(module, datamodule=_data())
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for column in ("val/accuracy", "val/answer_rate", "val/reasoning_length_mean", "val/reflection_rate", "train/reward"):
        assert column in header


def test_loading_a_checkpoint_with_other_components_is_refused(tmp_path):
    module = _steering()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=_data())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = _steering(selection=ComponentSelection(components=("blocks.0.attn.hook_z[2]",)))
    with pytest.raises(ValueError, match=r"checkpoint to resume from \(.*a.ckpt\) steers"):
        _trainer(tmp_path, max_epochs=2).fit(other, datamodule=_data(), ckpt_path=tmp_path / "a.ckpt")
    with pytest.raises(FileNotFoundError, match="Steering checkpoint not found"):
        load_steering_checkpoint(tmp_path / "missing.ckpt")


def _reference_log_likelihood(module, data):
    batch = next(iter(data.train_dataloader()))
    trajectories = teacher_forced_trajectories(module.tokenizer, batch["prompt"], batch["solution"])
    with torch.no_grad(), module.steering():
        return completion_log_probs(module.lm, trajectories).sum().item()


def test_learned_vectors_alone_raise_the_likelihood_of_reference_traces_within_their_norm_bound(tmp_path):
    data = _data(num_train=4, batch_size=4)
    free = _steering(objective="supervised", selection=None, vectors=VectorTraining(layers=[1]))
    data.connect(free.tokenizer)
    base_weights = {key: value.clone() for key, value in free.lm.state_dict().items()}
    before = _reference_log_likelihood(free, data)
    assert free.gates is None and free.vectors.norms() == {"blocks.1.hook_resid_post": 0.0}  # starts as the unsteered model
    _trainer(tmp_path / "free", max_epochs=5).fit(free, datamodule=data)
    assert _reference_log_likelihood(free, data) > before + 1.0
    assert all(torch.equal(value, base_weights[key]) for key, value in free.lm.state_dict().items())  # only the vector trained
    free_norm = free.vectors.norms()["blocks.1.hook_resid_post"]

    bound = free_norm / 2
    held = _steering(objective="supervised", selection=None, vectors=VectorTraining(layers=[1], max_norm=bound))
    trainer = _trainer(tmp_path / "held", max_epochs=5)
    trainer.fit(held, datamodule=data)
    assert held.vectors.norms()["blocks.1.hook_resid_post"] == pytest.approx(bound, rel=1e-5)  # projected back after each step

    trainer.save_checkpoint(tmp_path / "vectors.ckpt")
    saved = torch.load(tmp_path / "vectors.ckpt", weights_only=True)["state_dict"]
    assert list(saved) == ["vectors.vectors.blocks__1__hook_resid_post"]  # only what trained
    restored = load_steering_checkpoint(tmp_path / "vectors.ckpt", model="tiny:llama")
    assert restored.gates is None and restored.vectors.provenance == {"source": "learned", "max_norm": bound}
    with torch.no_grad(), restored.steering(), held.steering():
        torch.testing.assert_close(restored.lm(INPUT).logits, held.lm(INPUT).logits)


def test_learned_vectors_and_gates_train_together_and_export_to_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from ipg_lightning.steering.export import export_steered_model
    from ipg_lightning.steering.loading import SteeringSource, load_steered_model

    module = _steering(objective="supervised", vectors=VectorTraining(families=["resid_post", "mlp_out"], layers=[0]))
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=_data())
    assert module.gates.gate("blocks.1.mlp.hook_post")[3] != 1.0 and min(module.vectors.norms().values()) > 0
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    steered = load_steered_model("tiny:llama", source=SteeringSource(checkpoint=str(tmp_path / "both.ckpt")))
    assert steered.description.vectors == str(tmp_path / "both.ckpt") and steered.description.kind == "learned"
    with torch.no_grad(), module.steering():
        expected = module.lm(INPUT).logits
    card = export_steered_model(steered.model, steered.tokenizer, steered.gates, tmp_path / "export", vectors=steered.vectors)
    assert sorted(card["folded_vectors"]) == ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(exported(INPUT).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="carries learned steering vectors already"):
        load_steered_model("tiny:llama", source=SteeringSource(checkpoint=str(tmp_path / "both.ckpt"), vectors=_a_vector_file(tmp_path)))


def _a_vector_file(tmp_path):
    from ipg_lightning.vectors import SteeringVectors, save_vectors

    model = tiny_causal_lm("llama")
    path = tmp_path / "other.safetensors"
    save_vectors(SteeringVectors.for_model(model, ["resid_post"], [1]), path, model, "tiny:llama")
    return str(path)


def test_vector_training_settings_that_cannot_train_are_refused():
    with pytest.raises(ValueError, match="Nothing to steer: give components to gate"):
        _steering(selection=None)
    with pytest.raises(ValueError, match="weight_slices trains the weights of selected components"):
        _steering(selection=None, vectors=VectorTraining(), weight_slices=True)
    with pytest.raises(ValueError, match="vectors.max_norm must be a positive number"):
        VectorTraining(max_norm=0.0)
    with pytest.raises(ValueError, match="vectors.families must name sites among"):
        VectorTraining(families=["mlp_neuron"])
