"""What the vLLM engine refuses, and what it records, checked without vLLM (its own tests: test_vllm_engine.py)."""

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.interventions import installed_interventions
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.model.sites import discover_sites, edits_block_output
from ipg_lightning.rollout.sampling import sample_trajectories, sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig, VLLMSettings
from ipg_lightning.rollout.vllm_engine import model_directory_of
from ipg_lightning.rollout.vllm_gates import EngineGateError, check_mirrorable
from ipg_lightning.rollout.vllm_weights import WeightsWatch, weight_files_fingerprint
from ipg_lightning.sae import attach_sae
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH
from ipg_lightning.zoo.tiny import random_sae, tiny_causal_lm


def test_installed_interventions_lists_the_sets_on_a_model_while_they_are_attached():
    model = tiny_causal_lm("llama")
    first = ComponentGates.for_model(model, families=["mlp_neuron"], layers=[0])
    second = ComponentGates.for_model(model, families=["resid_post"], layers=[1])
    assert installed_interventions(model) == []
    with first.attach(model):
        with second.attach(model):
            assert installed_interventions(model) == [first, second]
        assert installed_interventions(model) == [first]
    assert installed_interventions(model) == []
    with pytest.raises(RuntimeError), first.attach(model):
        raise RuntimeError("a failed step")
    assert installed_interventions(model) == []


def test_what_the_engine_cannot_reproduce_is_refused_naming_the_hf_engine():
    model = tiny_causal_lm("llama")
    gates = ComponentGates.for_model(model, families=["mlp_neuron", "attn_head", "resid_post"], layers=[0, 1])
    with gates.attach(model):
        check_mirrorable(model, installed_interventions(model))  # gates alone mirror
        handle = model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
        with pytest.raises(EngineGateError, match="1 forward hooks besides its gates and steering vectors.*engine: hf"):
            check_mirrorable(model, installed_interventions(model))
        handle.remove()
    adapted = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(EngineGateError, match="PEFT adapter.*engine: hf"):
        check_mirrorable(adapted, [])
    moe = tiny_causal_lm("mixtral")
    experts = ComponentGates.for_model(moe, families=["expert"], layers=[0])
    with experts.attach(moe), pytest.raises(EngineGateError, match="fused expert weights.*engine: hf"):
        check_mirrorable(moe, installed_interventions(moe))
    sliced = tiny_causal_lm("llama")
    torch.nn.utils.parametrize.register_parametrization(sliced.model.layers[1].mlp.down_proj, "weight", torch.nn.Identity())
    with pytest.raises(EngineGateError, match="model.layers.1.mlp.down_proj are trained or reparametrised"):
        check_mirrorable(sliced, [])


def test_the_engine_loads_models_from_their_directory_only():
    model, _ = load_model_and_tokenizer(TINY_REASONER_PATH)
    assert model_directory_of(model) == TINY_REASONER_PATH
    with pytest.raises(ValueError, match="has none .*save_pretrained.*engine: hf"):
        model_directory_of(tiny_causal_lm("llama"))


def test_block_output_sites_are_the_residual_stream_and_the_saes_read_there():
    model = tiny_causal_lm("llama")
    attach_sae(model, random_sae(32, "blocks.1.hook_resid_post"))
    attach_sae(model, random_sae(32, "blocks.0.hook_mlp_out"))
    sites = {site.name: site for site in discover_sites(model, ["resid_post", "mlp_neuron", "attn_out", "sae_feature"])}
    on_blocks = {name for name, site in sites.items() if edits_block_output(site)}
    assert on_blocks == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_resid_post.sae"}


def test_vllm_settings_read_from_a_mapping_and_bad_values_are_named():
    config = SamplingConfig(engine="vllm", vllm={"enforce_eager": False, "max_model_len": 256})
    assert config.vllm == VLLMSettings(enforce_eager=False, max_model_len=256)
    assert config.as_greedy().engine == "vllm" and config.as_greedy().num_samples == 1
    with pytest.raises(ValueError, match="engine must be hf or vllm"):
        SamplingConfig(engine="sglang")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMSettings(gpu_memory_utilization=1.5)


def test_the_sampling_record_says_the_engine_and_what_holds_for_seeds():
    record = sampling_record(SamplingConfig(num_samples=4, temperature=0.7))
    assert record["engine"] == "hf" and "vllm" not in record and record["num_samples"] == 4
    assert record["seeding"].startswith("each completion from its own seed")
    assert sampling_record(SamplingConfig.greedy()).get("seeding").startswith("greedy")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_sampling_with_vllm_where_it_is_not_installed_says_how_to_install_it():
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    with pytest.raises(ImportError, match=r"needs vLLM .*pip install -e \"\.\[vllm\]\""):
        sample_trajectories(model, tokenizer, ["Q: 1 + 1 = ?\nA:"], SamplingConfig(engine="vllm", max_new_tokens=4))


def test_weights_changed_in_memory_or_on_disk_are_noticed(tmp_path):
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    model.save_pretrained(tmp_path)
    watch = WeightsWatch(str(tmp_path), frozenset())
    assert watch.differing_tensor(model) is None
    before = weight_files_fingerprint(str(tmp_path))
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[5, 3] += 1e-3  # as folding a gate would
    assert watch.differing_tensor(model) == "model.layers.2.mlp.down_proj.weight"
    model.save_pretrained(tmp_path)
    assert weight_files_fingerprint(str(tmp_path)) != before
    assert WeightsWatch(str(tmp_path), frozenset()).differing_tensor(model) is None


def test_weights_that_cannot_be_compared_are_not_taken_as_equal(tmp_path):
    model, _ = load_model_and_tokenizer(TINY_REASONER_PATH)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model.bin")  # no safetensors left to compare with
    assert "not in the directory's safetensors files" in WeightsWatch(str(tmp_path), frozenset()).differing_tensor(model)
