"""Attribution-guided fine-tuning: a LoRA adapter placed where the selection lives, and component-slice training."""

import pytest
import torch
from test_export import INPUT, PLAIN_LOADER, _in_fresh_process
from test_steering import _data, _trainer
from transformers import AutoModelForCausalLM

from ipg_lightning.gates.component_gates import parse_component_name
from ipg_lightning.model.sites import find_site
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import ComponentSelection
from ipg_lightning.steering.checkpoint import SteeringCheckpointError
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.steering.finetune.lora import adapted_weights
from ipg_lightning.steering.finetune.slices import attach_weight_slices, component_slices, merge_weight_slices
from ipg_lightning.steering.learned import GateSteering, LoraSettings
from ipg_lightning.zoo.tiny import TINY_FAMILIES, tiny_causal_lm, tiny_tokenizer

NEURON, HEAD, COORDINATE = "blocks.1.mlp.hook_post[5]", "blocks.2.attn.hook_z[3]", "blocks.1.hook_resid_post[7]"
PROBE = torch.tensor([[5, 17, 30, 42, 8, 9]])


def _steering(model, components, **kwargs):
    settings = dict(
        selection=ComponentSelection(components=tuple(components)),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, num_samples=4),
        learning_rate=0.1,
    )
    return GateSteering.for_model(model, tiny_tokenizer(), **{**settings, **kwargs})


def _lora_modules(components, placement, **overrides):
    module = _steering(tiny_causal_lm("llama", num_hidden_layers=4), components, lora=LoraSettings(r=2, placement=placement, **overrides))
    adapted = adapted_weights(module.lm)
    parameters = sum(p.numel() for name, p in module.lm.named_parameters() if "lora_" in name)
    return adapted["modules"], parameters


def test_localized_lora_adapts_exactly_the_modules_that_host_the_selection():
    modules, parameters = _lora_modules([NEURON, HEAD, COORDINATE], "localized")
    block = "model.layers.{}.{}".format
    expected = [
        block(1, "self_attn.o_proj"),  # the residual coordinate: both writes into block 1's output
        block(1, "mlp.gate_proj"),  # the neuron: its whole MLP
        block(1, "mlp.up_proj"),
        block(1, "mlp.down_proj"),
        *(block(2, f"self_attn.{name}") for name in ("q_proj", "k_proj", "v_proj", "o_proj")),  # the head: its attention
    ]
    assert modules == expected
    # Rank 2 on each: (in + out) * 2 parameters; Llama's tiny sizes are hidden 32, MLP 64, 4 heads x 8, 2 key/value heads.
    shapes = {"o_proj": (32, 32), "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32), "q_proj": (32, 32)}
    shapes |= {"k_proj": (32, 16), "v_proj": (32, 16)}
    assert parameters == sum(2 * sum(shapes[name.rpartition(".")[2]]) for name in expected)


def test_random_layer_control_has_the_same_modules_and_parameters_in_other_blocks():
    localized, localized_parameters = _lora_modules([NEURON, HEAD], "localized")
    control, control_parameters = _lora_modules([NEURON, HEAD], "random_layers")
    assert control_parameters == localized_parameters
    inside = sorted(path.split(".", 3)[3] for path in control)
    assert inside == sorted(path.split(".", 3)[3] for path in localized)
    assert {int(path.split(".")[2]) for path in control} == {0, 3}  # blocks 1 and 2 hold the selection
    everywhere, _ = _lora_modules([NEURON], "everywhere")
    assert len(everywhere) == 4 * 7
    with pytest.raises(ValueError, match="random_layers needs 4 blocks other than"):
        _lora_modules(["blocks.0.mlp.hook_post[1]", NEURON, HEAD, "blocks.3.attn.hook_z[0]"], "random_layers")
    with pytest.raises(ValueError, match="lora.placement must be one of"):
        LoraSettings(placement="somewhere")


def test_localized_lora_on_a_mixture_of_experts_adapts_the_fused_expert_weights_and_merges(tmp_path):
    module = _steering(tiny_causal_lm("qwen2_moe"), ["blocks.1.hook_mlp_out"], lora=LoraSettings(r=2, placement="localized"))
    assert module.fine_tune.adapter.parameters == ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj")
    shared = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate")  # the router is no projection
    assert module.fine_tune.adapter.modules == tuple(f"model.layers.1.mlp.{name}" for name in shared)
    trainable = [name for name, p in module.lm.named_parameters() if p.requires_grad]
    assert trainable and all("layers.1.mlp." in name and "lora_" in name for name in trainable)
    with torch.no_grad():
        for name in trainable:
            module.lm.get_parameter(name).normal_(0, 0.5)  # a trained adapter (B starts at zero)
        expected = module.lm(PROBE).logits  # (a gate on a mixture of experts' output needs the loader: kept at 1)
        card = export_steered_model(module.lm, module.tokenizer, module.gates, tmp_path / "export")
    assert card["lora_weights"]["parameters"] == list(module.fine_tune.adapter.parameters)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(exported(PROBE).logits, expected, rtol=1e-5, atol=1e-5)
    for placement in ("localized", "everywhere"):  # an adapter on the weights that a selected expert gate scales
        with pytest.raises(ValueError, match="gated by scaling .*, which a LoRA adapter cannot share"):
            _steering(tiny_causal_lm("qwen2_moe"), ["blocks.1.mlp.hook_expert[2]"], lora=LoraSettings(r=2, placement=placement))


def test_resuming_or_loading_with_an_adapter_placed_elsewhere_is_refused(tmp_path):
    first = _steering(tiny_causal_lm("llama", num_hidden_layers=4), [NEURON], lora=LoraSettings(r=2, placement="random_layers"))
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(first, datamodule=_data())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    recorded = torch.load(tmp_path / "a.ckpt", weights_only=True)["ipg_steering"]["adapter_targets"]
    assert recorded == first.fine_tune.adapter.as_dict() and recorded["modules"]
    other = _steering(
        tiny_causal_lm("llama", num_hidden_layers=4),
        [NEURON],
        lora=LoraSettings(r=2, placement="localized"),  # the same selection, but the adapter sits in block 1
    )
    with pytest.raises(SteeringCheckpointError, match="trained adapter_targets .* but this run builds"):
        _trainer(tmp_path, max_epochs=2).fit(other, datamodule=_data(), ckpt_path=tmp_path / "a.ckpt")


def _site_input(model, site):
    captured = []
    handle = model.get_submodule(site.module_path).register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    with torch.no_grad():
        model(PROBE)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("components", [["blocks.0.mlp.hook_post[5]"], ["blocks.1.attn.hook_z[0]", "blocks.1.attn.hook_z[1]"]], ids=["mlp", "attn"])
def test_weight_slices_move_only_their_own_components(family, components):
    model = tiny_causal_lm(family)
    site_name, _ = parse_component_name(components[0])
    site = find_site(model, site_name)
    before = _site_input(model, site)
    slices = component_slices(model, components)
    with torch.no_grad():
        for delta in attach_weight_slices(model, slices):
            delta.normal_(0, 0.5)
    after = _site_input(model, site)
    selected = torch.zeros(site.size)
    selected[[parse_component_name(name)[1] for name in components]] = 1
    own = site.channel_gates(selected).bool()
    assert torch.equal(after[..., ~own], before[..., ~own]), "another component's input moved"
    for unit in selected.nonzero().flatten().tolist():  # each selected component's own input moved
        channels = site.channel_gates(torch.eye(site.size)[unit]).bool()
        assert not torch.allclose(after[..., channels], before[..., channels]), f"component {unit} did not move"
    logits = model(PROBE).logits
    merge_weight_slices(model)
    assert torch.equal(model(PROBE).logits, logits)  # merging writes exactly the weights the model computed with


def test_slices_of_a_head_leave_keys_and_values_shared_with_unselected_heads_frozen():
    model = tiny_causal_lm("llama")  # 4 heads, 2 key/value groups

    def slices_of(*components):
        return {(piece.module.rpartition(".")[2], piece.dim): piece.indices for piece in component_slices(model, list(components))}

    assert slices_of("blocks.1.attn.hook_z[1]") == {("o_proj", 1): tuple(range(8, 16)), ("q_proj", 0): tuple(range(8, 16))}
    group = slices_of("blocks.1.attn.hook_z[2]", "blocks.1.attn.hook_z[3]")
    assert group[("k_proj", 0)] == group[("v_proj", 0)] == tuple(range(8, 16)) and group[("q_proj", 0)] == tuple(range(16, 32))
    # GPT-2: Conv1D weights are (in, out), and c_attn fuses q|k|v; head 1 of 4 (head_dim 8) owns columns 8-15 of each part.
    gpt2 = {(piece.module, piece.tensor, piece.dim): piece.indices for piece in component_slices(tiny_causal_lm("gpt2"), ["blocks.1.attn.hook_z[1]"])}
    head = tuple(range(8, 16))
    assert gpt2 == {
        ("transformer.h.1.attn.c_proj", "weight", 0): head,  # its input rows of the out-projection
        ("transformer.h.1.attn.c_attn", "weight", 1): head + tuple(32 + i for i in head) + tuple(64 + i for i in head),
        ("transformer.h.1.attn.c_attn", "bias", 0): head + tuple(32 + i for i in head) + tuple(64 + i for i in head),
    }
    # GPT-NeoX interleaves q, k, v per head: head 1 owns rows 24-47 of query_key_value.
    neox = {piece.module.rpartition(".")[2]: piece.indices for piece in component_slices(tiny_causal_lm("gpt_neox"), ["blocks.1.attn.hook_z[1]"])}
    assert neox["query_key_value"] == tuple(range(24, 48)) and neox["dense"] == head
    every_head = slices_of(*(f"blocks.1.attn.hook_z[{h}]" for h in range(4)))  # no other unit left to compare with
    assert every_head[("q_proj", 0)] == tuple(range(32)) and every_head[("k_proj", 0)] == tuple(range(16))
    residual = component_slices(model, ["blocks.0.hook_resid_post[7]"])
    assert [(piece.module, piece.dim, piece.indices) for piece in residual] == [
        ("model.layers.0.self_attn.o_proj", 0, (7,)),
        ("model.layers.0.mlp.down_proj", 0, (7,)),
    ]
    with pytest.raises(ValueError, match="expert components own no weight slices"):
        component_slices(tiny_causal_lm("mixtral"), ["blocks.1.mlp.hook_expert[0]"])


def _digit_probability(model, tokenizer, digit_ids, prompts):
    encoded = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in prompts]
    with torch.no_grad():
        return sum(model(ids).logits[0, -1].softmax(-1)[digit_ids].sum().item() for ids in encoded) / len(encoded)


def test_slice_training_moves_only_the_selected_slices_and_raises_a_planted_neuron(tmp_path):
    from test_attribution import _data as prompts_data
    from test_attribution import _planted_model, starts_with_digit

    model, tokenizer, digit_ids = _planted_model(neuron=5, target_p=0.3)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = [p for batch in prompts_data(num_val=6).val_dataloader() for p in batch["prompt"]]
    before = _digit_probability(model, tokenizer, digit_ids, prompts)
    module = GateSteering.for_model(
        model,
        tokenizer,
        selection=ComponentSelection(components=(NEURON,)),
        reward=starts_with_digit,
        sampling=SamplingConfig(max_new_tokens=1, num_samples=8),
        learning_rate=0.05,
        weight_slices=True,
        train_gates=False,
    )
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(module, datamodule=_data(num_train=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "slices.ckpt")
    after = _digit_probability(module.lm, tokenizer, digit_ids, prompts)
    assert after > before + 0.1
    checkpoint = torch.load(tmp_path / "slices.ckpt", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == sorted(
        f"lm.model.layers.1.mlp.{name}.parametrizations.weight.0.delta" for name in ("gate_proj", "up_proj", "down_proj")
    )
    assert sum(t.numel() for t in checkpoint["state_dict"].values()) == 3 * 32  # one row or column of 32 each
    merge_weight_slices(module.lm)
    changed = {name for name, p in module.lm.named_parameters() if not torch.equal(p, original[name])}
    assert changed == {f"model.layers.1.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
    mlp = module.lm.model.layers[1].mlp
    for name, column in (("gate_proj", False), ("up_proj", False), ("down_proj", True)):
        weight, was = getattr(mlp, name).weight, original[f"model.layers.1.mlp.{name}.weight"]
        other = torch.ones_like(weight, dtype=torch.bool)
        (other[:, 5] if column else other[5]).fill_(False)
        assert torch.equal(weight[other], was[other]), f"{name} changed outside neuron 5's slice"


def test_exported_slices_with_folded_gates_reproduce_the_trained_model_without_ipg_lightning(tmp_path, quiet_trainer):
    components = ("blocks.0.mlp.hook_post[3]", "blocks.1.attn.hook_z[2]", "blocks.1.attn.hook_z[3]")
    module = _steering(tiny_causal_lm("qwen2"), components, weight_slices=True, learning_rate=0.2)  # qwen2: biased q/k/v
    quiet_trainer(max_epochs=2).fit(module, datamodule=_data())
    assert not torch.all(module.gates.gate("blocks.1.attn.hook_z") == 1)
    with torch.no_grad():  # make the slices matter beyond two small steps
        for name, parameter in module.lm.named_parameters():
            if name.endswith(".delta"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    assert all(key.endswith(".delta") or key.startswith("gates.") for key in module.trainable_state())
    ids = torch.tensor(INPUT)
    with torch.no_grad(), module.gates.attach(module.lm):
        expected_logits = module.lm(ids).logits
        expected_tokens = module.lm.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    card = export_steered_model(module.lm, module.tokenizer, module.gates, tmp_path / "export")
    attention = [f"model.layers.1.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]  # heads 2, 3: a whole group
    assert card["weight_slices_merged"] == [f"model.layers.0.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")] + attention
    assert card["loader_sites"] == [] and set(card["folded_sites"]) == {"blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"}
    outputs = _in_fresh_process(PLAIN_LOADER, tmp_path / "export")
    torch.testing.assert_close(torch.tensor(outputs["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
    assert outputs["tokens"] == expected_tokens.tolist()
    assert "Trained weight slices merged into" in (tmp_path / "export" / "README.md").read_text()


def test_slices_disabled_gives_the_base_model_and_supervised_slices_raise_the_reference_likelihood(tmp_path):
    from test_steering import completion_log_probs, teacher_forced_trajectories

    from ipg_lightning.steering.finetune.slices import slices_disabled

    components = tuple(f"blocks.1.mlp.hook_post[{i}]" for i in range(8))
    module = _steering(tiny_causal_lm("llama"), components, objective="supervised", weight_slices=True, train_gates=False, learning_rate=0.05)
    base = tiny_causal_lm("llama")(PROBE).logits
    data = _data(num_train=4, batch_size=4)
    data.connect(module.tokenizer)
    batch = next(iter(data.train_dataloader()))
    trajectories = teacher_forced_trajectories(module.tokenizer, batch["prompt"], batch["solution"])

    def reference_log_likelihood():
        with torch.no_grad():
            return completion_log_probs(module.lm, trajectories).sum().item()

    before = reference_log_likelihood()
    _trainer(tmp_path, max_epochs=5).fit(module, datamodule=data)
    assert reference_log_likelihood() > before + 1.0
    with torch.no_grad():
        assert not torch.allclose(module.lm(PROBE).logits, base)
        with slices_disabled(module.lm):  # the base of the KL term
            assert torch.equal(module.lm(PROBE).logits, base)
