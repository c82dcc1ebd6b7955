import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.gates.exported import load_steered
from ipg_lightning.gates.folding import UnfoldableGateError, fold_gates_into_weights
from ipg_lightning.model.families import SITE_FAMILIES
from ipg_lightning.model.sites import projection_shape, unwrap_model
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.zoo.tiny import TINY_FAMILIES, tiny_causal_lm

FOLDABLE = ["mlp_neuron", "attn_head", "attn_out", "mlp_out"]
INPUT = torch.tensor([[5, 17, 30, 42, 8, 61, 9, 23]])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _random_gates(model, families, seed=1):
    gates = ComponentGates.for_model(model, families)
    generator = torch.Generator().manual_seed(seed)
    for name, site in gates.sites.items():
        gates.set_site(name, torch.rand(site.size, generator=generator) * 2)
    return gates


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gates_at_one_change_nothing(family, tiny_model):
    model = tiny_model(family)
    expected = model(INPUT).logits
    gates = ComponentGates.for_model(model, SITE_FAMILIES)
    with gates.attach(model):
        assert torch.equal(model(INPUT).logits, expected)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_neuron_gate_at_zero_equals_zeroing_the_down_projection_column(family, tiny_model):
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["mlp_neuron"], layers=[0])
    site = next(iter(gates.sites.values()))
    gates.set_component(site.component_name(7), 0.0)
    with gates.attach(model):
        gated = model(INPUT).logits
    manual = copy.deepcopy(model)
    projection = manual.get_submodule(site.module_path)
    with torch.no_grad():
        if type(projection).__name__ == "Conv1D":  # (in, out) layout
            projection.weight[7, :] = 0
        else:
            projection.weight[:, 7] = 0
    torch.testing.assert_close(gated, manual(INPUT).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(gated, model(INPUT).logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_head_gates_equal_a_manual_per_head_sum(family, tiny_model):
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["attn_head"], layers=[1])
    site = next(iter(gates.sites.values()))
    values = torch.tensor([0.0, 1.5, 1.0, 0.25])
    gates.set_site(site.name, values)
    projection = model.get_submodule(site.module_path)
    captured = {}
    hook = projection.register_forward_hook(lambda m, args, out: captured.update(z=args[0], out=out))
    with gates.attach(model):
        model(INPUT)
    gated_out = captured["out"]
    model(INPUT)  # the same layer's input z is upstream of the gate: capture it ungated
    hook.remove()
    z = captured["z"]
    in_features, _ = projection_shape(projection)
    weight = projection.weight if type(projection).__name__ == "Conv1D" else projection.weight.T  # (in, out)
    manual = sum(
        values[h] * z[..., h * site.head_dim : (h + 1) * site.head_dim] @ weight[h * site.head_dim : (h + 1) * site.head_dim]
        for h in range(site.size)
    )
    if projection.bias is not None:
        manual = manual + projection.bias
    assert in_features == site.size * site.head_dim
    torch.testing.assert_close(gated_out, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_folded_model_reproduces_gated_logits_and_greedy_generation(family, tiny_model):
    model = tiny_model(family)
    gates = _random_gates(model, FOLDABLE)
    for name, site in gates.sites.items():  # gates after a post-sub-layer norm travel in a steering file instead
        if not site.foldable:
            gates.set_site(name, 1.0)
    with gates.attach(model):
        gated_logits = model(INPUT).logits
        gated_tokens = model.generate(INPUT, max_new_tokens=12, do_sample=False, pad_token_id=0)
    folded = copy.deepcopy(model)
    assert set(fold_gates_into_weights(folded, gates)) == {name for name, site in gates.sites.items() if site.foldable}
    assert _hook_count(folded) == 0
    torch.testing.assert_close(folded(INPUT).logits, gated_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.generate(INPUT, max_new_tokens=12, do_sample=False, pad_token_id=0), gated_tokens)
    assert not torch.allclose(model(INPUT).logits, gated_logits)


def test_gates_apply_to_every_position_under_kv_cache(tiny_model):
    model = tiny_model("qwen2")
    gates = _random_gates(model, ["resid_post", "attn_head"])
    with gates.attach(model):
        cached = model.generate(INPUT, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=True)
        tokens = INPUT
        for _ in range(10):  # greedy without a cache: every step recomputes all positions
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(cached, tokens)


def test_residual_gates_refuse_to_fold_and_change_nothing(tiny_llama):
    gates = _random_gates(tiny_llama, ["resid_post", "mlp_neuron"])
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(UnfoldableGateError, match="blocks.0.hook_resid_post"):
        fold_gates_into_weights(tiny_llama, gates)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    gates.set_site("blocks.0.hook_resid_post", 1.0)
    gates.set_site("blocks.1.hook_resid_post", 1.0)
    assert fold_gates_into_weights(tiny_llama, gates) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]


def test_hooks_are_removed_on_exit_and_after_an_exception(tiny_model):
    model = tiny_model("gpt2")
    gates = ComponentGates.for_model(model, SITE_FAMILIES)
    with gates.attach(model):
        assert _hook_count(model) == 10
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), gates.attach(model):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_gate_values_are_validated_by_name(tiny_llama):
    gates = ComponentGates.for_model(tiny_llama, ["mlp_neuron", "attn_out"], layers=[0])
    with pytest.raises(ValueError, match=r"blocks.0.mlp.hook_post\[2\] must be finite, got nan"):
        gates.set_component("blocks.0.mlp.hook_post[2]", float("nan"))
    with pytest.raises(ValueError, match="blocks.0.mlp.hook_post must be finite, got inf"):
        gates.set_site("blocks.0.mlp.hook_post", torch.full((64,), float("inf")))
    with pytest.raises(KeyError, match="blocks.3.mlp.hook_post"):
        gates.set_component("blocks.3.mlp.hook_post[0]", 1.0)
    with pytest.raises(ValueError, match="needs an index"):
        gates.set_component("blocks.0.mlp.hook_post", 0.0)
    gates.set_component("blocks.0.hook_attn_out", 0.5)
    assert gates.gate("blocks.0.hook_attn_out").item() == 0.5
    assert gates.component_names()[:2] == ["blocks.0.mlp.hook_post[0]", "blocks.0.mlp.hook_post[1]"]
    assert gates.flat_values().shape == (gates.num_components,) == (65,)


def test_gate_gradient_is_the_activation_times_its_gradient(tiny_llama):
    """dL/dc_i = sum_t h_{t,i} dL/dh_{t,i} at c = 1 (docs/method.md section 3)."""
    gates = ComponentGates.for_model(tiny_llama, ["resid_post"], layers=[0])
    block = tiny_llama.get_submodule("model.layers.0")
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["h"] = output

    with gates.attach(tiny_llama):
        handle = block.register_forward_hook(keep)
        tiny_llama(INPUT).logits[0, -1, 3].backward()
        handle.remove()
    expected = (captured["h"] * captured["h"].grad).sum(dim=(0, 1))
    torch.testing.assert_close(gates.gate("blocks.0.hook_resid_post").grad, expected, rtol=1e-4, atol=1e-6)


def _lora_model(family):
    model = tiny_causal_lm(family)
    targets = ["o_proj", "down_proj", "q_proj"] if family != "gpt2" else ["c_proj", "c_attn"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=family == "gpt2")
    return get_peft_model(model, config)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gates_on_a_lora_model_fold_after_merging(family):
    peft_model = _lora_model(family).eval()
    assert hasattr(
        unwrap_model(peft_model).get_submodule("model.layers.0.self_attn.o_proj" if family == "llama" else "transformer.h.0.attn.c_proj"),
        "base_layer",
    )
    ungated = peft_model(INPUT).logits
    gates = ComponentGates.for_model(peft_model, FOLDABLE)
    with gates.attach(peft_model):
        assert torch.equal(peft_model(INPUT).logits, ungated)
    gates = _random_gates(peft_model, FOLDABLE)
    with gates.attach(peft_model):
        gated = peft_model(INPUT).logits
    assert not torch.allclose(gated, ungated)
    with pytest.raises(UnfoldableGateError, match="merge it first"):
        fold_gates_into_weights(peft_model, gates)
    merged = peft_model.merge_and_unload()
    fold_gates_into_weights(merged, gates)
    torch.testing.assert_close(merged(INPUT).logits, gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_gate_survives_export_and_the_one_line_loader(family, tiny_model, tokenizer, tmp_path):
    """Folded gates and unfoldable ones (residual, and sub-layer gates after a norm) together reproduce the gated model."""
    model = tiny_model(family)
    gates = _random_gates(model, SITE_FAMILIES)
    with gates.attach(model):
        gated_logits = model(INPUT).logits
        gated_tokens = model.generate(INPUT, max_new_tokens=8, do_sample=False, pad_token_id=0)
    card = export_steered_model(model, tokenizer, gates, tmp_path / "export")
    assert set(card["loader_sites"]) == {name for name, site in gates.sites.items() if not site.foldable}
    reloaded = load_steered(tmp_path / "export")
    torch.testing.assert_close(reloaded(INPUT).logits, gated_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(reloaded.generate(INPUT, max_new_tokens=8, do_sample=False, pad_token_id=0), gated_tokens)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2"])
def test_a_sub_layer_gate_after_a_post_norm_scales_what_the_sub_layer_adds(family, tiny_model, run_gated):
    """Post-norm blocks add norm(o_proj(...)); a gate of 0.5 must halve that term (on o_proj's output the norm would undo it)."""
    model = tiny_model(family)
    gates = ComponentGates.for_model(model, ["attn_out"], layers=[1])
    site = next(iter(gates.sites.values()))
    assert site.module_path == "model.layers.1.post_attention_layernorm" and not site.foldable
    block = model.model.layers[1]

    def run(gate: float) -> dict:
        gates.set_site(site.name, gate)
        outputs = {"attn": block.post_attention_layernorm, "mlp": block.post_feedforward_layernorm, "out": block}
        return run_gated(model, gates, {"residual": block}, outputs, INPUT)

    plain, halved = run(1.0), run(0.5)
    torch.testing.assert_close(halved["attn"], 0.5 * plain["attn"], rtol=1e-5, atol=1e-6)  # the term added to the residual
    torch.testing.assert_close(halved["out"], halved["residual"] + 0.5 * plain["attn"] + halved["mlp"], rtol=1e-5, atol=1e-5)
