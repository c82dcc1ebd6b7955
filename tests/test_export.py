import json
import subprocess
import sys

import pytest
import torch

from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.gates.exported import read_card
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.steering.learned import GateSteering, LoraSettings
from ipg_lightning.vectors import SteeringVectors
from ipg_lightning.zoo.tiny import tiny_causal_lm, tiny_tokenizer

INPUT = [[5, 17, 30, 42, 8, 61, 9, 23]]

# Runs in a fresh interpreter: only transformers (or, for the loader path, ipg_lightning.load_steered).
PLAIN_LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("ipg_lightning") for name in sys.modules), "ipg_lightning was imported"
"""
STEERED_LOADER = """
import json, sys, torch
from ipg_lightning import load_steered
from ipg_lightning.rollout.trajectories import SamplingConfig
model = load_steered(sys.argv[1])
"""
REPORT = """
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
print(json.dumps({"logits": logits.tolist(), "tokens": tokens.tolist()}))
"""


def _in_fresh_process(loader: str, path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", loader + REPORT, str(path), json.dumps(INPUT)], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _gated_outputs(model, gates):
    ids = torch.tensor(INPUT)
    with torch.no_grad(), gates.attach(model):
        return model(ids).logits, model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)


def _trained_lora_steering(quiet_trainer):
    components = ("blocks.0.mlp.hook_post[3]", "blocks.1.attn.hook_z[2]", "blocks.1.hook_mlp_out")
    module = GateSteering.for_model(
        tiny_causal_lm("qwen2"),
        tiny_tokenizer(),
        selection=ComponentSelection(components=components),
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0),
        learning_rate=0.2,
        lora=LoraSettings(r=2, target_modules=["q_proj", "o_proj"]),
    )
    data = ReasoningDataModule(num_train=4, num_val=2, num_test=2, batch_size=4, template=PromptTemplate(use_chat_template=False))
    quiet_trainer(max_epochs=2).fit(module, datamodule=data)
    with torch.no_grad():  # make the adapter matter: B starts at zero and barely moves in 2 steps
        for name, parameter in module.lm.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return module.eval()


def test_folded_export_with_merged_lora_runs_without_ipg_lightning(tmp_path, quiet_trainer):
    module = _trained_lora_steering(quiet_trainer)
    expected_logits, expected_tokens = _gated_outputs(module.lm, module.gates)
    card = export_steered_model(module.lm, module.tokenizer, module.gates, tmp_path / "export")
    assert card["lora_merged"] and card["loader_sites"] == []
    assert set(card["folded_sites"]) == {"blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"}
    assert set(card["gates"]) == {"blocks.0.mlp.hook_post[3]", "blocks.1.attn.hook_z[2]", "blocks.1.hook_mlp_out"}
    outputs = _in_fresh_process(PLAIN_LOADER, tmp_path / "export")
    torch.testing.assert_close(torch.tensor(outputs["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
    assert outputs["tokens"] == expected_tokens.tolist()
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "steering_card.json"} <= files


def test_residual_gates_travel_in_a_steering_file_and_the_loader_reproduces_them(tmp_path, tiny_llama, tokenizer):
    gates = gates_for_components(tiny_llama, ["blocks.1.hook_resid_post[3]", "blocks.0.attn.hook_z[1]"], 0.0)
    gates.set_component("blocks.1.hook_resid_post[5]", 1.7)
    expected_logits, expected_tokens = _gated_outputs(tiny_llama, gates)
    card = export_steered_model(tiny_llama, tokenizer, gates, tmp_path / "export")
    assert card["loader_sites"] == ["blocks.1.hook_resid_post"] and card["folded_sites"] == ["blocks.0.attn.hook_z"]
    assert "load_steered" in card["how_to_load"]
    steered = _in_fresh_process(STEERED_LOADER, tmp_path / "export")
    torch.testing.assert_close(torch.tensor(steered["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
    assert steered["tokens"] == expected_tokens.tolist()
    plain = _in_fresh_process(PLAIN_LOADER, tmp_path / "export")  # without the loader the residual gates are absent
    assert not torch.allclose(torch.tensor(plain["logits"]), expected_logits, atol=1e-3)


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch, tiny_model, tokenizer):
    model = tiny_model("gpt2")
    gates = gates_for_components(model, ["blocks.0.mlp.hook_post[1]"], 0.5)
    export_steered_model(model, tokenizer, gates, tmp_path / "export")
    with pytest.raises(FileExistsError, match="already exists"):
        export_steered_model(model, tokenizer, gates, tmp_path / "export")

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_steered_model(tiny_model("gpt2"), tokenizer, gates, tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert read_card(tmp_path / "export")["folded_sites"] == ["blocks.0.mlp.hook_post"]


def _vectors(model, sites, alpha=1.5):
    vectors = SteeringVectors.for_model(model, ["resid_post", "attn_out", "mlp_out"], [0, 1], alpha=alpha)
    generator = torch.Generator().manual_seed(3)
    chosen = SteeringVectors([vectors.sites[name] for name in sites], vectors.width, alpha=alpha)
    for name in sites:
        chosen.set_vector(name, torch.randn(vectors.width, generator=generator))
    return chosen


def test_vectors_that_fold_become_biases_plain_transformers_loads(tmp_path, tiny_llama, tokenizer):
    vectors = _vectors(tiny_llama, ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
    gates = gates_for_components(tiny_llama, ["blocks.0.mlp.hook_post[3]", "blocks.1.hook_mlp_out"], 0.5)
    ids = torch.tensor(INPUT)
    with torch.no_grad(), gates.attach(tiny_llama), vectors.attach(tiny_llama):
        expected_logits = tiny_llama(ids).logits
        expected_tokens = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    card = export_steered_model(tiny_llama, tokenizer, gates, tmp_path / "exported", vectors=vectors)
    assert sorted(card["folded_vectors"]) == sorted(vectors.sites) and card["loader_vectors"] == []
    assert sorted(card["vector_bias_flags"]) == ["attention_bias", "mlp_bias"] and card["vectors"]["alpha"] == 1.5
    assert not (tmp_path / "exported" / "steering_vectors.safetensors").exists()
    plain = _in_fresh_process(PLAIN_LOADER, tmp_path / "exported")  # a process that never imports the library
    torch.testing.assert_close(torch.tensor(plain["logits"]), expected_logits, rtol=1e-4, atol=1e-4)
    assert plain["tokens"] == expected_tokens.tolist()


def test_a_vector_after_hooked_block_output_gates_travels_in_the_vector_file_and_the_loader_adds_it_last(tmp_path, tiny_llama, tokenizer):
    vectors = _vectors(tiny_llama, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
    gates = gates_for_components(tiny_llama, [f"blocks.1.hook_resid_post[{i}]" for i in range(0, 32, 3)], 0.3)
    ids = torch.tensor(INPUT)
    with torch.no_grad(), gates.attach(tiny_llama), vectors.attach(tiny_llama):
        expected_logits = tiny_llama(ids).logits
        expected_tokens = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    card = export_steered_model(tiny_llama, tokenizer, gates, tmp_path / "exported", vectors=vectors)
    # the gates scale block 1's output before its vector is added, so that vector cannot be a bias inside the block
    assert card["folded_vectors"] == ["blocks.0.hook_mlp_out"] and card["loader_vectors"] == ["blocks.1.hook_resid_post"]
    assert (tmp_path / "exported" / "steering_vectors.safetensors").exists()
    assert "blocks.1.hook_resid_post" in json.loads((tmp_path / "exported" / "config.json").read_text())["ipg_lightning_steering"]["unfolded_sites"]
    loaded = _in_fresh_process(STEERED_LOADER, tmp_path / "exported")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, rtol=1e-4, atol=1e-4)
    assert loaded["tokens"] == expected_tokens.tolist()
    with pytest.raises(ValueError, match="carries steering vectors from an earlier export"):
        from ipg_lightning import load_steered

        export_steered_model(load_steered(tmp_path / "exported"), tokenizer, None, tmp_path / "again", vectors=vectors)
