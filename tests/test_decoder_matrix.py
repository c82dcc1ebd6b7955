"""Every tiny decoder type: discovery under PEFT, IPG completeness, and the mixture-of-experts types.

(The gate, fold, generate and export checks of the same matrix are in ``test_gates.py``.)
"""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipg_lightning.attribution import AttributionReport
from ipg_lightning.attribution.estimator import integrate_path, move_along_path
from ipg_lightning.cli import run
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.gates.exported import load_steered
from ipg_lightning.gates.folding import fold_gates_into_weights
from ipg_lightning.model.families import EXPERT_SITE_FAMILIES, SITE_FAMILIES, UnsupportedArchitectureError
from ipg_lightning.model.sites import discover_sites, find_site, resolve_architecture
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood, weighted_log_likelihood
from ipg_lightning.rollout.trajectories import teacher_forced_trajectories
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.zoo.tiny import TINY_FAMILIES, TINY_MOE_FAMILIES

INPUT = torch.tensor([[5, 17, 30, 42, 8, 61, 9, 23]])
SUB_LAYER_AND_UNIT_FAMILIES = ["mlp_neuron", "attn_head", "attn_out", "mlp_out"]
#: Quadrature points where q = 32 is not enough for a 1e-3 residual on these random tiny models: the
#: tiny Gemma 3's head path is steep near gate 0 (residual 0.19 at q = 16, 1.2e-3 at 32, 3e-6 at 128),
#: and OPT's ReLU MLP puts kinks on the path, where Gauss-Legendre converges slowly (3.7e-3 at 32, 8e-4 at 128).
STEPS = {"gemma3_text": 128, "opt": 128}


def _assert_scores_add_up(model, gates, name, tokenizer, steps=32):
    """IPG over fixed teacher-forced trajectories along the path of site ``name``: the scores sum to L(1) - L(0) within 1e-3."""
    trajectories = teacher_forced_trajectories(tokenizer, ["Q: 3 + 4 =", "Q: 9 - 2 ="], [" 7 #### 7", " 7 #### 7"])
    weights = torch.tensor([1.0, -0.5])
    with gates.attach(model):
        result = integrate_path(
            gates, [name], lambda alpha: backward_weighted_log_likelihood(model, trajectories, weights), rule="gauss_legendre", steps=steps
        )
        at_one = weighted_log_likelihood(model, trajectories, weights)
        move_along_path(gates, [name], 0.0, 0.0)
        at_zero = weighted_log_likelihood(model, trajectories, weights)
        gates.reset(1.0)
    total = float(result.scores[name].double().sum())
    assert abs(total - (at_one - at_zero)) <= 1e-3 * max(1.0, abs(at_one - at_zero)), (name, total, at_one - at_zero)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_peft_wrapped_model_has_the_same_sites_gates_through_the_adapter_and_folds_after_merging(family, tiny_model):
    model = tiny_model(family)
    plain_sites = discover_sites(model, SITE_FAMILIES, layers=[1])
    targets = sorted({site.module_path.rsplit(".", 1)[-1] for site in plain_sites if site.hooks_input})
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=family == "gpt2"))
    assert discover_sites(wrapped, SITE_FAMILIES, layers=[1]) == plain_sites
    expected = wrapped(INPUT).logits
    gates = ComponentGates.for_model(wrapped, SITE_FAMILIES)
    with gates.attach(wrapped):
        assert torch.equal(wrapped(INPUT).logits, expected)
    # Non-trivial gates act through the adapter's wrappers; after merging, the foldable ones fold exactly.
    generator = torch.Generator().manual_seed(1)
    for name, site in gates.sites.items():
        gates.set_site(name, torch.rand(site.size, generator=generator) * 2 if site.foldable else torch.ones(site.size))
    with torch.no_grad():
        for parameter_name, parameter in wrapped.named_parameters():
            if "lora_B" in parameter_name:  # a trained-looking adapter, not the identity it starts as
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    with gates.attach(wrapped):
        gated = wrapped(INPUT).logits
    merged = wrapped.merge_and_unload()
    fold_gates_into_weights(merged, gates)
    torch.testing.assert_close(merged(INPUT).logits, gated, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ipg_scores_add_up_to_the_surrogate_change_at_q32(family, tiny_model, tokenizer):
    """Completeness of the path integral over fixed trajectories, per site family (Gauss-Legendre, q = 32 unless noted)."""
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, SUB_LAYER_AND_UNIT_FAMILIES, layers=[1])
    for name in gates.sites:
        _assert_scores_add_up(model, gates, name, tokenizer, steps=STEPS.get(family, 32))


MOE_SITE_FAMILIES = ["resid_post", "attn_head", "attn_out", "mlp_out"]


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_moe_models_have_every_site_but_single_mlp_neurons(family, tiny_model):
    model = tiny_model(family)
    expected = model(INPUT).logits
    gates = ComponentGates.for_model(model, MOE_SITE_FAMILIES)
    with gates.attach(model):
        assert torch.equal(model(INPUT).logits, expected)
    assert gates.sites["blocks.1.hook_mlp_out"].module_path == "model.layers.1.mlp" and not gates.sites["blocks.1.hook_mlp_out"].foldable
    with pytest.raises(ValueError, match="is a mixture of experts, so mlp_neuron sites do not exist there; use expert_neuron"):
        discover_sites(model, ["mlp_neuron"])
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"]))
    assert discover_sites(wrapped, MOE_SITE_FAMILIES, layers=[1]) == discover_sites(model, MOE_SITE_FAMILIES, layers=[1])


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_the_moe_mlp_gate_scales_what_the_experts_add_and_leaves_the_router_alone(family, tiny_model, run_gated):
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["mlp_out"], layers=[1])
    block = model.model.layers[1]
    router = next(module for name, module in block.mlp.named_children() if name in ("gate", "router"))

    def run(gate: float) -> dict:
        gates.set_site("blocks.1.hook_mlp_out", gate)
        return run_gated(model, gates, {}, {"mlp": block.mlp, "router": router, "out": block}, INPUT)

    plain, halved = run(1.0), run(0.5)
    assert torch.equal(halved["router"], plain["router"])  # routing is untouched
    torch.testing.assert_close(halved["mlp"], 0.5 * plain["mlp"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(halved["out"], plain["out"] - 0.5 * plain["mlp"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_moe_gates_survive_export_and_their_ipg_scores_add_up(family, tiny_model, tokenizer, tmp_path):
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["mlp_out", "attn_head"], layers=[1])
    name = "blocks.1.hook_mlp_out"  # after the routing of its block: a smooth path (gates before a router make it piecewise)
    _assert_scores_add_up(model, gates, name, tokenizer)
    gates.set_site(name, 0.3)
    gates.set_site("blocks.1.attn.hook_z", torch.tensor([0.0, 1.5, 1.0, 0.5]))
    with gates.attach(model):
        gated = model(INPUT).logits
    card = export_steered_model(model, tokenizer, gates, tmp_path / "export")
    assert card["loader_sites"] == [name] and card["folded_sites"] == ["blocks.1.attn.hook_z"]
    torch.testing.assert_close(load_steered(tmp_path / "export")(INPUT).logits, gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_sub_layer_gate_removes_exactly_its_share_of_what_the_block_adds(family, tiny_model, run_gated):
    """mlp_out at 0.5 in the last block: the block's output loses half of what its MLP added (after any post-norm)."""
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["mlp_out"], layers=[1])
    site = gates.sites["blocks.1.hook_mlp_out"]
    block = model.get_submodule(f"{resolve_architecture(model).layers}.1")
    term = model.get_submodule(site.module_path)
    plain = run_gated(model, gates, {}, {"term": term, "out": block}, INPUT)
    gates.set_site(site.name, 0.5)
    halved = run_gated(model, gates, {}, {"out": block}, INPUT)
    torch.testing.assert_close(halved["out"], plain["out"] - 0.5 * plain["term"], rtol=1e-5, atol=1e-5)


def _expert_families(family):
    return list(EXPERT_SITE_FAMILIES) if family == "qwen2_moe" else ["expert_neuron", "expert"]


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_expert_gates_equal_editing_the_fused_expert_weights_by_hand(family, tiny_model):
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["expert_neuron", "expert"], layers=[1])
    assert find_site(model, "blocks.1.mlp.experts.2.hook_post") == gates.sites["blocks.1.mlp.experts.2.hook_post"]
    gates.set_component("blocks.1.mlp.experts.2.hook_post[5]", 0.0)
    gates.set_component("blocks.1.mlp.hook_expert[1]", 0.5)
    with gates.attach(model):
        gated = model(INPUT).logits
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in tiny_model(family).named_parameters()]  # restored
    manual = tiny_model(family)
    experts = manual.model.layers[1].mlp.experts
    with torch.no_grad():
        if experts.down_proj.shape[1] == 32:  # (experts, hidden, width): F.linear layout, channels last
            experts.down_proj[2, :, 5] = 0
        else:  # (experts, width, hidden): x @ W layout
            experts.down_proj[2, 5, :] = 0
        experts.down_proj[1] *= 0.5
        if getattr(experts, "down_proj_bias", None) is not None:
            experts.down_proj_bias[1] *= 0.5
    torch.testing.assert_close(gated, manual(INPUT).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gated, model(INPUT).logits)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_expert_gates_fold_export_and_add_up(family, tiny_model, tokenizer, tmp_path):
    model = tiny_model(family)
    names = _expert_families(family)
    gates = ComponentGates.for_model(model, names, layers=[1])
    for name in ["blocks.1.mlp.experts.0.hook_post", "blocks.1.mlp.hook_expert"]:  # after the block's routing: smooth paths
        _assert_scores_add_up(model, gates, name, tokenizer)
    generator = torch.Generator().manual_seed(1)
    for name, site in gates.sites.items():
        gates.set_site(name, torch.rand(site.size, generator=generator) * 2)
    with gates.attach(model):
        gated_logits = model(INPUT).logits
        gated_tokens = model.generate(INPUT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    card = export_steered_model(model, tokenizer, gates, tmp_path / "export")
    assert set(card["folded_sites"]) == set(gates.sites) and card["loader_sites"] == []
    reloaded = load_steered(tmp_path / "export")
    torch.testing.assert_close(reloaded(INPUT).logits, gated_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(reloaded.generate(INPUT, max_new_tokens=8, do_sample=False, pad_token_id=0), gated_tokens)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "olmo2"])
def test_heads_wider_than_hidden_over_heads_gate_and_fold_exactly(family, tiny_model):
    model = tiny_model(family, head_dim=16)  # 4 heads x 16 = 64 channels into o_proj, hidden 32
    gates = ComponentGates.for_model(model, ["attn_head"], layers=[0, 1])
    site = gates.sites["blocks.1.attn.hook_z"]
    assert (site.size, site.head_dim) == (4, 16)
    for name in gates.sites:
        gates.set_site(name, torch.tensor([0.0, 1.5, 1.0, 0.25]))
    with gates.attach(model):
        gated = model(INPUT).logits
    fold_gates_into_weights(model, gates)
    torch.testing.assert_close(model(INPUT).logits, gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "families"), [("gemma3_text", "[attn_out, mlp_out]"), ("olmo2", "[attn_out, mlp_out]"), ("qwen3_moe", "[expert_neuron, expert]")]
)
def test_ipg_attribute_runs_on_the_command_line(family, families, tmp_path):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "attribute_tiny.yaml")
    arguments = ["attribute", "--config", recipe, "--model.model_path", f"tiny:{family}", "--model.families", families, "--model.layers", "[1]"]
    run(
        [
            *arguments,
            "--model.steps",
            "16",
            "--model.rule",
            "gauss_legendre",
            "--model.output_dir",
            str(tmp_path / "r"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    report = AttributionReport.load(tmp_path / "r")
    assert report.metadata.model == f"tiny:{family}" and report.metadata.completeness.relative_residual < 0.05


def test_experts_held_as_a_module_list_are_refused_rather_than_mistaken_for_the_mlp(tiny_llama):
    mlp = tiny_llama.model.layers[0].mlp
    mlp.experts = torch.nn.ModuleList([torch.nn.Linear(8, 8)])  # the shape of per-expert layouts in older or remote-code models
    with pytest.raises(UnsupportedArchitectureError, match=r"holds its experts as a module list \(mlp.experts\)"):
        discover_sites(tiny_llama, ["mlp_out"])


@pytest.mark.parametrize("family", TINY_FAMILIES + TINY_MOE_FAMILIES)
def test_sae_features_splice_into_every_decoder_type(family, tiny_model):
    from ipg_lightning.sae import attach_sae
    from ipg_lightning.zoo.tiny import random_sae

    model = tiny_model(family)
    width = model.config.hidden_size
    for point in ("hook_resid_post", "hook_mlp_out", "hook_attn_out"):
        attach_sae(model, random_sae(width, f"blocks.1.{point}", k=4))
    gates = ComponentGates.for_model(model, ["sae_feature"], layers=[1])
    assert sorted(gates.sites) == ["blocks.1.hook_attn_out.sae", "blocks.1.hook_mlp_out.sae", "blocks.1.hook_resid_post.sae"]
    ids = torch.tensor([[3, 8, 15, 4, 22, 9]])
    with torch.no_grad():
        plain = model(ids).logits
        with gates.attach(model):
            unchanged = model(ids).logits
        gates.reset(0.0)
        with gates.attach(model):
            removed = model(ids).logits
    assert (unchanged - plain).abs().max() < 1e-5
    assert (removed - plain).abs().max() > 1e-4  # the splice sits where the model reads it
