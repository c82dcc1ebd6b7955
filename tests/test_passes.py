"""The ways the teacher-forced passes can run give the same IPG scores as the plain passes: replaying
the frozen blocks below the gates (which really skips them), chunking by tokens, a memory budget,
activation checkpointing (which really keeps less for backward); and the lean log-probabilities
equal ``log_softmax``."""

import pytest
import torch

from ipg_lightning.attribution.paths import integrate_fixed
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.rollout.passes.frozen_prefix import first_live_block
from ipg_lightning.rollout.passes.memory import PeakMemory, peak_is_resettable
from ipg_lightning.rollout.passes.teacher_forced import MemoryLimits, TeacherForcedPasses, padded_tokens, token_chunks
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood
from ipg_lightning.rollout.token_log_probs import target_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import attach_sae, detach_saes
from ipg_lightning.zoo.tiny import random_sae

PROMPTS = ["Start with 7. Add 5.", "What is 2+3?", "Compute 12*4 now."]


def _sample(model, tokenizer):
    return sample_trajectories(model, tokenizer, PROMPTS, SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=10))


def _scores(model, tokenizer, families, layers, reuse_prefix, path="layer", limits=MemoryLimits(), chunk_size=4):
    trajectories = _sample(model, tokenizer)
    weights = torch.linspace(-1.0, 1.0, len(trajectories))
    gates = ComponentGates.for_model(model, families, layers)
    passes = TeacherForcedPasses(model, chunk_size, first_live_block(model, gates.sites.values()), limits, reuse_prefix)
    with gates.attach(model):
        return integrate_fixed(model, gates, trajectories, weights, path, 0.0, ("gauss_legendre", 4), passes)


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_a_gate_on_a_blocks_output_replays_that_block_too_with_the_same_scores(family, tiny_model, tokenizer, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    gates = ComponentGates.for_model(model, ["resid_post"], [1])
    assert first_live_block(model, gates.sites.values()) == 2
    cached, cached_delta = _scores(model, tokenizer, ["resid_post"], [1], reuse_prefix=True)
    fresh, fresh_delta = _scores(model, tokenizer, ["resid_post"], [1], reuse_prefix=False)
    torch.testing.assert_close(cached["blocks.1.hook_resid_post"], fresh["blocks.1.hook_resid_post"], rtol=0, atol=1e-6)
    assert cached_delta == pytest.approx(fresh_delta, abs=1e-6) and float(fresh["blocks.1.hook_resid_post"].abs().sum()) > 0
    # the same for the features of an SAE spliced at that output
    sae = random_sae(d_in=model.config.hidden_size, hook_name="blocks.1.hook_resid_post", d_sae=32, k=4)
    attach_sae(model, sae)
    try:
        cached, cached_delta = _scores(model, tokenizer, ["sae_feature"], [1], reuse_prefix=True)
        fresh, fresh_delta = _scores(model, tokenizer, ["sae_feature"], [1], reuse_prefix=False)
    finally:
        detach_saes(model)
    torch.testing.assert_close(cached["blocks.1.hook_resid_post.sae"], fresh["blocks.1.hook_resid_post.sae"], rtol=0, atol=1e-6)
    assert cached_delta == pytest.approx(fresh_delta, abs=1e-6) and float(fresh["blocks.1.hook_resid_post.sae"].abs().sum()) > 0


def test_several_layers_and_a_family_path_on_a_deeper_model(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    for path in ("layer", "family"):
        cached, _ = _scores(model, tokenizer, ["mlp_neuron", "resid_post"], [2, 3], reuse_prefix=True, path=path)
        fresh, _ = _scores(model, tokenizer, ["mlp_neuron", "resid_post"], [2, 3], reuse_prefix=False, path=path)
        for name in fresh:
            torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=1e-6)


def test_the_frozen_blocks_run_once_per_chunk(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    trajectories = _sample(model, tokenizer)
    calls = {"below": 0, "gated": 0}
    model.model.layers[1].mlp.register_forward_hook(lambda *_: calls.__setitem__("below", calls["below"] + 1))
    model.model.layers[2].mlp.register_forward_hook(lambda *_: calls.__setitem__("gated", calls["gated"] + 1))
    for reuse_prefix, below in ((True, 2), (False, 12)):
        gates = ComponentGates.for_model(model, ["mlp_neuron"], [2])
        calls.update(below=0, gated=0)  # after discovery's probe pass
        with gates.attach(model):  # 6 rows in 2 chunks x (4 Gauss-Legendre points + both ends of the path)
            passes = TeacherForcedPasses(model, 4, 2, reuse_prefix=reuse_prefix)
            integrate_fixed(model, gates, trajectories, torch.ones(6), "layer", 0.0, ("gauss_legendre", 4), passes)
        assert calls == {"below": below, "gated": 12}
    calls.update(below=0, gated=0)
    gates = ComponentGates.for_model(model, ["resid_post"], [1])  # on block 1's output: block 1 is frozen too
    with gates.attach(model):
        passes = TeacherForcedPasses(model, 4, first_live_block(model, gates.sites.values()), reuse_prefix=True)
        integrate_fixed(model, gates, trajectories, torch.ones(6), "layer", 0.0, ("gauss_legendre", 4), passes)
    assert calls == {"below": 2, "gated": 12}


@pytest.mark.parametrize(
    "limits",
    [MemoryLimits(chunk_tokens=40), MemoryLimits(checkpoint_blocks=True), MemoryLimits(chunk_tokens=1, checkpoint_blocks=True)],
    ids=["chunk_tokens", "checkpoint_blocks", "one_row_and_checkpoint"],
)
@pytest.mark.parametrize(
    "family, site_families", [("llama", ["mlp_neuron", "attn_head", "resid_post", "mlp_out"]), ("gpt2", ["mlp_neuron", "attn_out"])]
)
def test_memory_limits_give_the_same_scores(limits, family, site_families, tiny_model, tokenizer):
    model = tiny_model(family, num_hidden_layers=3)
    plain, plain_delta = _scores(model, tokenizer, site_families, [1], reuse_prefix=False, chunk_size=6)
    bounded, bounded_delta = _scores(model, tokenizer, site_families, [1], reuse_prefix=True, limits=limits, chunk_size=6)
    for name in plain:
        torch.testing.assert_close(bounded[name], plain[name], rtol=1e-6, atol=1e-6)  # float32 sums in another order: ~1 ulp of scores near 4
    assert bounded_delta == pytest.approx(plain_delta, abs=5e-5)  # L(1) - L(0) of float32 sums of ~1e2 over other chunks


def test_token_chunks_respect_both_bounds_and_keep_row_order(tiny_model, tokenizer):
    trajectories = _sample(tiny_model("llama"), tokenizer)
    widths = [len(p) + len(c) for p, c in zip(trajectories.prompt_ids, trajectories.completion_ids, strict=True)]
    budget = 2 * max(widths)
    layout = token_chunks(trajectories, 0, 4, budget)
    assert [row for rows in layout for row in rows] == list(range(len(trajectories)))
    for rows in layout:
        assert len(rows) <= 4 and (len(rows) == 1 or padded_tokens(trajectories, rows) <= budget)
        # maximal: the next row would break a bound
        if rows.stop < len(trajectories):
            longer = range(rows.start, rows.stop + 1)
            assert len(longer) > 4 or padded_tokens(trajectories, longer) > budget
    assert token_chunks(trajectories, 0, 4, 1) == [range(r, r + 1) for r in range(len(trajectories))]
    assert token_chunks(trajectories, 0, 4, None) == [range(0, 4), range(4, 6)]


@pytest.mark.skipif(not peak_is_resettable(torch.device("cpu")), reason="the CPU peak counter cannot be reset here (no Linux /proc)")
def test_a_budget_sizes_the_chunks_from_the_first_rows_measured_cost(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    trajectories = _sample(model, tokenizer)
    gates = ComponentGates.for_model(model, ["mlp_neuron"], [1])
    tight = TeacherForcedPasses(model, 6, 1, MemoryLimits(budget_gb=1e-9))
    roomy = TeacherForcedPasses(model, 6, 1, MemoryLimits(budget_gb=64.0))
    with gates.attach(model):
        with pytest.warns(UserWarning, match="rows that long run alone and exceed the budget; set memory.checkpoint_blocks"):
            integrate_fixed(model, gates, trajectories, torch.ones(6), "layer", 0.0, ("right", 2), tight)
        integrate_fixed(model, gates, trajectories, torch.ones(6), "layer", 0.0, ("right", 2), roomy)
    assert tight.chunk_tokens == 1 and tight.layout == [range(r, r + 1) for r in range(6)]
    assert roomy.chunk_tokens > 10_000 and roomy.layout == [range(0, 1), range(1, 6)]


def _saved_bytes_of_one_backward(model, trajectories, passes):
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        backward_weighted_log_likelihood(model, trajectories, torch.ones(len(trajectories)), passes=passes)
    return sum(saved)


def test_checkpointing_keeps_less_for_backward_and_reruns_the_live_blocks(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    trajectories = _sample(model, tokenizer)
    gates = ComponentGates.for_model(model, ["mlp_neuron"], [1])
    runs = {"gated": 0}  # (recomputation stops once backward has what it needs: count a module early in the block)
    model.model.layers[3].input_layernorm.register_forward_hook(lambda *_: runs.__setitem__("gated", runs["gated"] + 1))
    with gates.attach(model):
        plain = _saved_bytes_of_one_backward(model, trajectories, TeacherForcedPasses(model, 6, 1))
        runs["gated"] = 0
        checkpointed = _saved_bytes_of_one_backward(model, trajectories, TeacherForcedPasses(model, 6, 1, MemoryLimits(checkpoint_blocks=True)))
    assert runs["gated"] == 2  # forward, then again in backward
    assert checkpointed < 0.5 * plain


def test_lean_log_probs_equal_log_softmax_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr("ipg_lightning.rollout.token_log_probs.POSITIONS_PER_SLICE", 3)  # several slices
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = (4 * torch.randn(2, 5, 11, generator=generator)).to(dtype).requires_grad_(True)
        targets = torch.randint(0, 11, (2, 5), generator=generator)
        weights = torch.randn(2, 5, generator=generator)
        lean = target_log_probs(logits, targets)
        (lean * weights).sum().backward()
        lean_grad, logits.grad = logits.grad.clone(), None
        reference = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        (reference * weights).sum().backward()
        assert lean.dtype == torch.float32 and lean_grad.dtype == dtype
        torch.testing.assert_close(lean, reference, rtol=0, atol=tolerance)
        torch.testing.assert_close(lean_grad.float(), logits.grad.float(), rtol=0, atol=tolerance)


def test_memory_limits_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        MemoryLimits(chunk_tokens=0)
    with pytest.raises(ValueError, match="budget_gb must be positive"):
        MemoryLimits(budget_gb=0)
    with pytest.raises(ValueError, match="not both"):
        MemoryLimits(chunk_tokens=64, budget_gb=1.0)


@pytest.mark.skipif(not peak_is_resettable(torch.device("cpu")), reason="the CPU peak counter cannot be reset here (no Linux /proc)")
def test_peak_memory_sees_a_large_block_and_an_inner_meter_hides_nothing():
    size = 64 * 2**20
    with PeakMemory("cpu") as outer:
        block = torch.ones(size // 4)  # 64 MiB, touched
        del block
        with PeakMemory("cpu") as inner:
            pass
    assert outer.peak_above_start_bytes >= 0.9 * size
    assert inner.peak_above_start_bytes < 0.5 * size
