"""SAE features as sites: the splice is exact at gates 1, a gate of 0 removes exactly one decoder
contribution, and everything that works for a site family works for them (generate, PEFT, errors)."""

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipg_lightning.gates.component_gates import ComponentGates, combined_gates
from ipg_lightning.model.families import sae_point
from ipg_lightning.model.sites import discover_sites, find_site
from ipg_lightning.sae import attach_sae, attached_saes, detach_saes
from ipg_lightning.zoo.tiny import random_sae

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 30, 11]])


def independent_topk_features(sae, z):
    """The format's equations, written out: ReLU of the k largest of (z - b_dec) W_enc + b_enc, others 0."""
    pre = (z - sae.b_dec) @ sae.W_enc + sae.b_enc
    kth = pre.sort(dim=-1, descending=True).values[..., sae.k - 1 : sae.k]
    return torch.where(pre >= kth, pre.clamp(min=0), torch.zeros(()))


@pytest.fixture
def model_with_sae(tiny_llama):
    sae = random_sae(hook_name="blocks.1.hook_resid_post", d_sae=64, k=8)
    attach_sae(tiny_llama, sae)
    return tiny_llama, sae


def test_sae_features_are_a_site_family(model_with_sae):
    model, sae = model_with_sae
    (site,) = discover_sites(model, ["sae_feature"], [1])
    assert (site.name, site.size, site.foldable, site.module_path) == ("blocks.1.hook_resid_post.sae", 64, False, "model.layers.1")
    assert site.component_name(17) == "blocks.1.hook_resid_post.sae[17]"
    assert find_site(model, "blocks.1.hook_resid_post.sae").sae is sae
    assert [site.family for site in discover_sites(model, ["sae_feature", "mlp_neuron"], [0, 1])] == ["mlp_neuron", "sae_feature", "mlp_neuron"]


def test_gates_at_one_change_nothing_in_forward_and_generate(model_with_sae):
    model, _ = model_with_sae
    gates = ComponentGates.for_model(model, ["sae_feature"], [1])
    plain = model(IDS).logits
    plain_generated = model.generate(IDS, max_new_tokens=12, do_sample=False)
    with gates.attach(model):
        gated = model(IDS).logits
        gated_generated = model.generate(IDS, max_new_tokens=12, do_sample=False)
    assert (gated - plain).abs().max() < 1e-5
    assert torch.equal(gated_generated, plain_generated)


def test_gate_zero_subtracts_that_features_decoder_contribution(model_with_sae, run_gated):
    model, sae = model_with_sae
    block = model.model.layers[1]
    plain = run_gated(model, ComponentGates([]), {}, {"block": block}, IDS)["block"]
    features = independent_topk_features(sae, plain)
    feature = int(features[0].abs().sum(0).argmax())  # one that fires somewhere
    gates = ComponentGates.for_model(model, ["sae_feature"], [1])
    gates.set_component(f"blocks.1.hook_resid_post.sae[{feature}]", 0.0)
    gated = run_gated(model, gates, {}, {"block": block}, IDS)["block"]
    by_hand = plain - features[..., feature : feature + 1] * sae.W_dec[feature]
    assert features[..., feature].abs().max() > 0.1
    assert torch.allclose(gated, by_hand, atol=1e-5)


def test_an_sae_on_the_mlp_output_is_spliced_where_mlp_out_hooks(tiny_llama, run_gated):
    sae = random_sae(hook_name="blocks.0.hook_mlp_out", k=4, seed=1)
    attach_sae(tiny_llama, sae)
    (site,) = discover_sites(tiny_llama, ["sae_feature"], [0])
    assert site.module_path == "model.layers.0.mlp.down_proj"
    down = tiny_llama.model.layers[0].mlp.down_proj
    plain = run_gated(tiny_llama, ComponentGates([]), {}, {"down": down}, IDS)["down"]
    gates = ComponentGates([site], init=0.5)
    gated = run_gated(tiny_llama, gates, {}, {"down": down}, IDS)["down"]
    assert torch.allclose(gated, plain - 0.5 * independent_topk_features(sae, plain) @ sae.W_dec, atol=1e-5)


def test_peft_wrapped_model_gates_sae_features_like_the_plain_one(model_with_sae):
    model, _ = model_with_sae
    gates = ComponentGates.for_model(model, ["sae_feature"], [1], init=0.0)
    with gates.attach(model):
        expected = model(IDS).logits
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    with gates.attach(wrapped):
        assert torch.allclose(wrapped(IDS).logits, expected, atol=1e-5)
    assert discover_sites(wrapped, ["sae_feature"], [1])[0].name == "blocks.1.hook_resid_post.sae"


def test_mismatched_or_missing_saes_are_refused_by_name(tiny_llama):
    with pytest.raises(ValueError, match="reads 48 channels.*has 32"):
        attach_sae(tiny_llama, random_sae(d_in=48))
    assert not attached_saes(tiny_llama)  # a refused SAE is not left attached
    with pytest.raises(ValueError, match="Layer 7 is out of range"):
        attach_sae(tiny_llama, random_sae(hook_name="blocks.7.hook_resid_post"))
    with pytest.raises(ValueError, match="hook_z.*cannot be spliced"):
        attach_sae(tiny_llama, random_sae(hook_name="blocks.1.attn.hook_z"))
    with pytest.raises(ValueError, match="No SAE is attached at layers \\[1\\]"):
        discover_sites(tiny_llama, ["sae_feature"], [1])
    attach_sae(tiny_llama, random_sae())
    with pytest.raises(ValueError, match="Another SAE is attached at blocks.1.hook_resid_post.sae"):
        attach_sae(tiny_llama, random_sae(seed=1))
    detach_saes(tiny_llama)
    assert not attached_saes(tiny_llama)


def test_resid_pre_is_the_previous_blocks_output():
    assert sae_point("blocks.3.hook_resid_pre").site_name == "blocks.2.hook_resid_post.sae"
    with pytest.raises(ValueError, match="cannot be spliced"):
        sae_point("blocks.0.hook_resid_pre")


def test_export_carries_the_sae_with_its_gates_and_load_steered_reapplies_them(tmp_path, model_with_sae, tokenizer):
    from test_export import PLAIN_LOADER, STEERED_LOADER, _gated_outputs, _in_fresh_process

    from ipg_lightning.steering import gates_for_components
    from ipg_lightning.steering.export import export_steered_model

    model, _ = model_with_sae
    plain_logits, _ = _gated_outputs(model, ComponentGates([]))
    gates = gates_for_components(model, ["blocks.1.hook_resid_post.sae[3]", "blocks.1.hook_resid_post.sae[9]", "blocks.0.mlp.hook_post[2]"], 0.0)
    gates.set_component("blocks.1.hook_resid_post.sae[3]", 3.0)
    expected_logits, expected_tokens = _gated_outputs(model, gates)
    assert not torch.allclose(expected_logits, plain_logits, atol=1e-3)  # the feature gates matter here
    card = export_steered_model(model, tokenizer, gates, tmp_path / "export")
    assert card["folded_sites"] == ["blocks.0.mlp.hook_post"] and card["loader_sites"] == card["carried_saes"] == ["blocks.1.hook_resid_post.sae"]
    steered = _in_fresh_process(STEERED_LOADER, tmp_path / "export")
    torch.testing.assert_close(torch.tensor(steered["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
    assert steered["tokens"] == expected_tokens.tolist()
    plain = _in_fresh_process(PLAIN_LOADER, tmp_path / "export")  # without the loader the SAE gates are absent
    assert not torch.allclose(torch.tensor(plain["logits"]), expected_logits, atol=1e-3)


def test_ipg_over_sae_features_is_complete_at_q_32(tmp_path, tiny_llama, tokenizer):
    from test_attribution import _data, _run

    from ipg_lightning.sae import save_sae

    save_sae(random_sae(hook_name="blocks.1.hook_resid_post", k=8), tmp_path / "sae")
    report = _run(tiny_llama, tokenizer, _data(), families=["sae_feature"], layers=[1], steps=32, rule="midpoint", saes=[str(tmp_path / "sae")])
    completeness = report.metadata.completeness
    assert completeness.relative_residual < 1e-3 and abs(completeness.surrogate_delta) > 1e-3
    assert list(report.sites) == ["blocks.1.hook_resid_post.sae"] and report.sites["blocks.1.hook_resid_post.sae"]["size"] == 64
    assert report.metadata.saes == {"blocks.1.hook_resid_post.sae": str((tmp_path / "sae").resolve())}


@pytest.mark.parametrize("method", ["grad_x_act", "activation", "mean_diff", "ig_reference", "random"])
def test_every_baseline_scores_sae_features(model_with_sae, tokenizer, method):
    from test_attribution import _data, _run, has_digit

    model, _ = model_with_sae
    report = _run(model, tokenizer, _data(), families=["sae_feature"], layers=[1], method=method, steps=4, reward=has_digit)
    scores = report.scores["blocks.1.hook_resid_post.sae"]
    assert scores.shape == (64,) and torch.isfinite(scores).all() and scores.abs().sum() > 0


def test_learned_gates_on_sae_features_train_and_reload_with_their_sae(tmp_path, tiny_llama, tokenizer, quiet_trainer):
    from ipg_lightning.data import PromptTemplate, ReasoningDataModule
    from ipg_lightning.rollout.trajectories import SamplingConfig
    from ipg_lightning.sae import save_sae
    from ipg_lightning.steering import ComponentSelection
    from ipg_lightning.steering.learned import GateSteering, load_steering_checkpoint

    sae = random_sae(hook_name="blocks.1.hook_resid_post", k=8)
    save_sae(sae, tmp_path / "sae")
    with torch.no_grad():  # two features that fire often
        firing = (sae.encode(tiny_llama(IDS, output_hidden_states=True).hidden_states[2]) != 0).sum((0, 1))
    components = tuple(f"blocks.1.hook_resid_post.sae[{int(index)}]" for index in firing.topk(2).indices)
    module = GateSteering.for_model(
        tiny_llama,
        tokenizer,
        model_path="tiny:llama",
        selection=ComponentSelection(components=components, saes=(str(tmp_path / "sae"),)),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=8, num_samples=4, temperature=1.0, top_p=1.0),
        learning_rate=0.2,
    )
    data = ReasoningDataModule(num_train=4, num_val=2, num_test=2, batch_size=4, template=PromptTemplate(use_chat_template=False))
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, datamodule=data)
    trained = module.gate_values()
    assert any(value != 1.0 for value in trained.values())
    gate = module.gates.gate("blocks.1.hook_resid_post.sae")
    assert int((gate.detach() != 1).sum()) == 2  # only the selected features moved
    trainer.save_checkpoint(tmp_path / "gates.ckpt")
    restored = load_steering_checkpoint(tmp_path / "gates.ckpt")  # a fresh tiny:llama: the SAE comes back from the selection
    assert restored.gate_values() == pytest.approx(trained)
    assert restored.gates.sites["blocks.1.hook_resid_post.sae"].sae is not None


def test_a_loaded_export_can_be_steered_again_with_the_same_sae(tmp_path, tiny_llama, tokenizer):
    from ipg_lightning.gates.exported import load_steered
    from ipg_lightning.sae import save_sae
    from ipg_lightning.steering import gates_for_components
    from ipg_lightning.steering.export import export_steered_model

    save_sae(random_sae(), tmp_path / "sae")
    attach_sae(tiny_llama, tmp_path / "sae")
    export_steered_model(tiny_llama, tokenizer, gates_for_components(tiny_llama, ["blocks.1.hook_resid_post.sae[2]"], 0.5), tmp_path / "export")
    loaded = load_steered(tmp_path / "export")
    assert attach_sae(loaded, tmp_path / "sae") == "blocks.1.hook_resid_post.sae"  # recognised by its source, not read again
    with pytest.raises(ValueError, match="Another SAE is attached"):
        attach_sae(loaded, random_sae(seed=3))
    (site,) = discover_sites(loaded, ["sae_feature"], [1])
    other = ComponentGates([dataclasses.replace(site, sae=random_sae(seed=3))])
    with pytest.raises(ValueError, match="holds a different SAE in each set"):
        combined_gates(ComponentGates([site]), other)


def test_a_selection_of_neurons_from_a_mixed_report_needs_no_sae(tmp_path, tiny_model, tokenizer):
    from test_attribution import _data, _run, has_digit

    from ipg_lightning.sae import save_sae
    from ipg_lightning.steering import ComponentSelection

    save_sae(random_sae(hook_name="blocks.1.hook_resid_post", k=8), tmp_path / "sae")
    report = _run(
        tiny_model(), tokenizer, _data(), families=["sae_feature", "mlp_neuron"], layers=[1], steps=2, reward=has_digit, saes=[str(tmp_path / "sae")]
    )
    report.save(tmp_path / "report")
    (tmp_path / "sae").rename(tmp_path / "moved")  # the SAE is not where the report says any more
    fresh = tiny_model()
    neurons = ComponentSelection(report=str(tmp_path / "report"), k=3, family="mlp_neuron")
    neurons.attach_saes(fresh)
    assert all(name.startswith("blocks.1.mlp.hook_post[") for name in neurons.resolve(fresh))
    with pytest.raises(FileNotFoundError, match="not at"):
        ComponentSelection(report=str(tmp_path / "report"), k=3).attach_saes(fresh)


def test_a_gamma_sweep_over_sae_features_splices_the_reports_sae(tmp_path):
    from ipg_lightning.attribution.report import AttributionReport
    from ipg_lightning.data import ReasoningDataModule
    from ipg_lightning.evaluation import evaluate_generations
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.rollout.trajectories import SamplingConfig
    from ipg_lightning.sae import load_sae
    from ipg_lightning.steering import gates_for_components
    from ipg_lightning.steering.loading import load_steered_model
    from ipg_lightning.steering.selection import ComponentSelection
    from ipg_lightning.steering.sweep import gamma_sweep
    from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH, TINY_REASONER_TASK

    site, width = "blocks.2.hook_resid_post.sae", load_sae(TINY_REASONER_SAE_PATH).d_sae
    metadata = {"model": TINY_REASONER_PATH, "saes": {site: TINY_REASONER_SAE_PATH}}
    AttributionReport({site: torch.arange(float(width))}, {site: {"family": "sae_feature", "layer": 2, "size": width}}, metadata).save(tmp_path / "r")
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=48)

    def problems(tokenizer):
        data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=4, num_val=0, num_train=0, batch_size=4)
        data.connect(tokenizer)
        return list(data.test_dataloader())

    base = load_steered_model(TINY_REASONER_PATH)
    selection = ComponentSelection(report=str(tmp_path / "r"), k=width)
    rows = gamma_sweep(base, problems(base.tokenizer), greedy, [selection], [0.0, 1.0])

    # independently: the plain model, and a fresh one with the SAE spliced by hand and all its features gated to 0
    plain, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    expected_base = evaluate_generations(plain, tokenizer, problems(tokenizer), greedy).metrics
    attach_sae(plain, TINY_REASONER_SAE_PATH)
    features = [f"{site}[{index}]" for index in range(width)]
    expected_off = evaluate_generations(plain, tokenizer, problems(tokenizer), greedy, gates_for_components(plain, features, 0.0)).metrics
    assert [(row["k"], row["gamma"]) for row in rows] == [(0, 1.0), (width, 0.0), (width, 1.0)]
    metrics = [{key: value for key, value in row.items() if key not in ("k", "gamma")} for row in rows]
    assert metrics[0] == metrics[2] == expected_base  # a spliced SAE with its gates at 1 changes nothing
    assert metrics[1] == expected_off != expected_base  # the features' gates act in the sweep
