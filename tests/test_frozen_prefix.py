"""Replaying the frozen blocks below the gates gives the same IPG scores as recomputing them, on
several decoder types and site families, and really skips those blocks."""

import pytest
import torch

from ipg_lightning.attribution.paths import integrate_fixed
from ipg_lightning.gates import ComponentGates
from ipg_lightning.trajectories import SamplingConfig, sample_trajectories

PROMPTS = ["Start with 7. Add 5.", "What is 2+3?", "Compute 12*4 now."]


def _scores(model, tokenizer, families, layers, reuse_prefix, path="layer"):
    trajectories = sample_trajectories(model, tokenizer, PROMPTS, SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=10))
    weights = torch.linspace(-1.0, 1.0, len(trajectories))
    gates = ComponentGates.for_model(model, families, layers)
    with gates.attach(model):
        return integrate_fixed(model, gates, trajectories, weights, path, 0.0, ("gauss_legendre", 4), chunk_size=4, reuse_prefix=reuse_prefix)


@pytest.mark.parametrize(
    "family, site_families",
    [
        ("llama", ["resid_post", "mlp_neuron", "attn_head", "attn_out", "mlp_out"]),
        ("gpt2", ["mlp_neuron", "attn_head", "resid_post"]),
        ("falcon", ["mlp_neuron", "attn_out", "mlp_out"]),
        ("gemma2", ["attn_head", "attn_out", "mlp_out"]),
        ("mixtral", ["expert_neuron", "attn_head", "mlp_out"]),
    ],
)
def test_replayed_prefix_gives_the_same_scores(family, site_families, tiny_model, tokenizer):
    model = tiny_model(family)
    cached, cached_delta = _scores(model, tokenizer, site_families, [1], reuse_prefix=True)
    fresh, fresh_delta = _scores(model, tokenizer, site_families, [1], reuse_prefix=False)
    assert cached.keys() == fresh.keys()
    for name in fresh:
        torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=1e-6)
    assert cached_delta == pytest.approx(fresh_delta, abs=1e-6)
    assert sum(float(v.abs().sum()) for v in fresh.values()) > 0


def test_several_layers_and_a_family_path_on_a_deeper_model(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    for path in ("layer", "family"):
        cached, _ = _scores(model, tokenizer, ["mlp_neuron", "resid_post"], [2, 3], reuse_prefix=True, path=path)
        fresh, _ = _scores(model, tokenizer, ["mlp_neuron", "resid_post"], [2, 3], reuse_prefix=False, path=path)
        for name in fresh:
            torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=1e-6)


def test_the_frozen_blocks_run_once_per_chunk(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    trajectories = sample_trajectories(model, tokenizer, PROMPTS, SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=10))
    calls = {"below": 0, "gated": 0}
    model.model.layers[1].mlp.register_forward_hook(lambda *_: calls.__setitem__("below", calls["below"] + 1))
    model.model.layers[2].mlp.register_forward_hook(lambda *_: calls.__setitem__("gated", calls["gated"] + 1))
    for reuse_prefix, below in ((True, 2), (False, 12)):
        gates = ComponentGates.for_model(model, ["mlp_neuron"], [2])
        calls.update(below=0, gated=0)  # after discovery's probe pass
        with gates.attach(model):  # 6 rows in 2 chunks x (4 Gauss-Legendre points + both ends of the path)
            integrate_fixed(model, gates, trajectories, torch.ones(6), "layer", 0.0, ("gauss_legendre", 4), chunk_size=4, reuse_prefix=reuse_prefix)
        assert calls == {"below": below, "gated": 12}
