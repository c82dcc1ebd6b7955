import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.families import ARCHITECTURES, FAMILIES, SITE_FAMILIES, ArchitectureSpec, SiteFamily, UnsupportedArchitectureError
from ipg_lightning.model.sites import discover_sites, parse_site_name
from ipg_lightning.steering.finetune.placement import localized_targets
from ipg_lightning.steering.finetune.slices import component_slices
from ipg_lightning.zoo.tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_discovers_every_site_family_with_sizes_from_config(family, tiny_model):
    model = tiny_model(family)
    sites = discover_sites(model, SITE_FAMILIES, layers=[-1])
    by_family = {site.family: site for site in sites}
    assert {site.layer for site in sites} == {1}
    assert by_family["resid_post"].size == 32
    mlp_width = 4 * 32 if family in ("bloom", "falcon") else 64  # these configs fix the MLP at 4 x hidden
    assert by_family["mlp_neuron"].size == mlp_width
    assert (by_family["attn_head"].size, by_family["attn_head"].head_dim) == (4, 8)
    assert by_family["attn_out"].size == by_family["mlp_out"].size == 1
    for site in sites:
        model.get_submodule(site.module_path)  # the path resolves on the real model


def test_names_follow_transformerlens_vocabulary(tiny_llama):
    sites = {s.family: s for s in discover_sites(tiny_llama, SITE_FAMILIES, layers=[1])}
    assert sites["resid_post"].component_name(17) == "blocks.1.hook_resid_post[17]"
    assert sites["mlp_neuron"].component_name(3) == "blocks.1.mlp.hook_post[3]"
    assert sites["attn_head"].component_name(2) == "blocks.1.attn.hook_z[2]"
    assert sites["attn_out"].component_name(0) == "blocks.1.hook_attn_out"
    assert sites["mlp_out"].component_name(0) == "blocks.1.hook_mlp_out"
    with pytest.raises(IndexError, match="has 4 components"):
        sites["attn_head"].component_name(4)


def _tiny_bloom():
    config = BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(config)


def test_an_undiscoverable_model_is_refused_listing_what_was_found_and_how_to_declare(tiny_llama):
    tiny_llama.config.num_hidden_layers = 3  # a config that does not describe the model: no list of 3 blocks
    with pytest.raises(UnsupportedArchitectureError) as error:
        discover_sites(tiny_llama)
    message = str(error.value)
    assert "'llama'" in message and "model.layers (2)" in message and "ArchitectureSpec(layers=" in message
    assert "attn_out_proj" in message and "mlp_out_proj" in message
    assert ARCHITECTURES == {}  # no override is needed by any decoder the tests build


def test_discovery_finds_what_a_declared_layout_says():
    spec = ArchitectureSpec(layers="transformer.h", attn_out_proj="self_attention.dense", mlp_out_proj="mlp.dense_4h_to_h")
    declared = discover_sites(_tiny_bloom(), ["mlp_neuron", "attn_head", "mlp_out"], layers=[1], architecture=spec)
    assert discover_sites(_tiny_bloom(), ["mlp_neuron", "attn_head", "mlp_out"], layers=[1]) == declared


def test_declared_architecture_makes_an_unknown_model_work():
    spec = ArchitectureSpec(layers="transformer.h", attn_out_proj="self_attention.dense", mlp_out_proj="mlp.dense_4h_to_h")
    sites = discover_sites(_tiny_bloom(), ["mlp_neuron", "attn_head"], layers=[0], architecture=spec)
    assert [(s.module_path, s.size) for s in sites] == [
        ("transformer.h.0.mlp.dense_4h_to_h", 128),
        ("transformer.h.0.self_attention.dense", 4),
    ]


def test_wrong_declared_path_names_the_path(tiny_llama):
    spec = ArchitectureSpec(layers="model.layers", attn_out_proj="attn.out", mlp_out_proj="mlp.down_proj")
    with pytest.raises(UnsupportedArchitectureError, match="'model.layers.0.attn.out'"):
        discover_sites(tiny_llama, ["attn_head"], layers=[0], architecture=spec)


def test_bad_family_and_layer_are_named(tiny_llama):
    with pytest.raises(ValueError, match="resid_pre"):
        discover_sites(tiny_llama, ["resid_pre"])
    with pytest.raises(ValueError, match="Layer 5 is out of range for a model with 2 blocks"):
        discover_sites(tiny_llama, layers=[5])


def test_head_edit_scales_only_that_heads_slice(tiny_llama):
    site = discover_sites(tiny_llama, ["attn_head"], layers=[0])[0]
    activation = torch.ones(1, 2, 32)
    out = site.edit(activation, torch.tensor([1.0, 0.0, 2.0, 1.0]))
    assert torch.equal(out[..., 8:16], torch.zeros(1, 2, 8))
    assert torch.equal(out[..., 16:24], torch.full((1, 2, 8), 2.0))
    assert torch.equal(out[..., :8], torch.ones(1, 2, 8))


def test_a_new_site_family_is_one_table_entry(monkeypatch, tiny_llama):
    """A family declared only in FAMILIES is discovered, named, gated, hosted and sliced like the family it mirrors."""
    mirror = SiteFamily("mlp_channel", "blocks.{layer}.mlp.hook_channel", "mlp", hooks_input=True, slices="units")
    monkeypatch.setitem(FAMILIES, mirror.name, mirror)
    assert parse_site_name("blocks.1.mlp.hook_channel") == ("mlp_channel", 1)
    (site,) = discover_sites(tiny_llama, ["mlp_channel"], layers=[1])
    (neuron,) = discover_sites(tiny_llama, ["mlp_neuron"], layers=[1])
    assert (site.module_path, site.size, site.foldable) == (neuron.module_path, neuron.size, neuron.foldable)
    inputs = torch.tensor([[5, 17, 30, 42, 8, 61, 9, 23]])
    logits = []
    for family in ("mlp_channel", "mlp_neuron"):
        gates = ComponentGates.for_model(tiny_llama, [family], layers=[1])
        gates.set_component(f"{discover_sites(tiny_llama, [family], [1])[0].name}[3]", 0.0)
        with gates.attach(tiny_llama):
            logits.append(tiny_llama(inputs).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    assert localized_targets(tiny_llama, ["blocks.1.mlp.hook_channel[3]"]) == localized_targets(tiny_llama, ["blocks.1.mlp.hook_post[3]"])
    assert component_slices(tiny_llama, ["blocks.1.mlp.hook_channel[3]"]) == component_slices(tiny_llama, ["blocks.1.mlp.hook_post[3]"])
