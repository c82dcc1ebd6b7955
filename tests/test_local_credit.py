"""The ``local`` credit path gives, for every gate, sum_t d log pi(a_t) / d c_t: the gate's effect on
the token predicted at its own position only. Checked against a brute force that gives each
position its own gate and reads the diagonal of the Jacobian, one backward pass per position."""

import pytest
import torch

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.sites import resolve_architecture
from ipg_lightning.rollout.passes.local_credit import LocalCreditError
from ipg_lightning.rollout.passes.teacher_forced import MemoryLimits, TeacherForcedPasses
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood, completion_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig

PROMPTS = ["Start with 7. Add 5.", "What is 2+3?", "Compute 12*4 now."]
LAYER = 1


def _trajectories(model, tokenizer):
    return sample_trajectories(model, tokenizer, PROMPTS, SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8))


def _block(model):
    return model.get_submodule(resolve_architecture(model).layers)[LAYER]


def _brute_force(model, trajectories, weights):
    """d/dc of sum_r w_r sum_j log pi(a_j^r), counting only each position's own gate (local) or all (full)."""
    padded = trajectories.padded()
    rows, width = padded["input_ids"].shape
    gate = torch.ones(rows, width, model.config.hidden_size, requires_grad=True)

    def scale(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        scaled = hidden * gate
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    handle = _block(model).register_forward_hook(scale)
    try:
        log_probs = completion_log_probs(model, trajectories)
    finally:
        handle.remove()
    prompt_width = width - log_probs.shape[1]
    local = torch.zeros(model.config.hidden_size)
    for column in range(log_probs.shape[1]):  # token j is predicted at position prompt_width + j - 1
        (gradient,) = torch.autograd.grad((weights * log_probs[:, column]).sum(), gate, retain_graph=True)
        local += gradient[:, prompt_width + column - 1].sum(0)
    (full,) = torch.autograd.grad((weights[:, None] * log_probs).sum(), gate)
    return local, full.sum((0, 1))


def _gate_gradient(model, trajectories, weights, local_credit, limits=MemoryLimits()):
    gates = ComponentGates.for_model(model, ["resid_post"], [LAYER])
    passes = TeacherForcedPasses(model, 4, LAYER, limits, reuse_prefix=True, local_credit=local_credit)
    with gates.attach(model):
        backward_weighted_log_likelihood(model, trajectories, weights, passes=passes)
    return next(iter(gates.parameters())).grad


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "gpt_oss"])
def test_local_credit_equals_the_diagonal_of_the_per_position_jacobian(family, tiny_model, tokenizer):
    model = tiny_model(family, num_hidden_layers=3)
    trajectories = _trajectories(model, tokenizer)
    weights = torch.linspace(-1.0, 1.0, len(trajectories))
    local, full = _brute_force(model, trajectories, weights)
    torch.testing.assert_close(_gate_gradient(model, trajectories, weights, local_credit=True), local, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_gate_gradient(model, trajectories, weights, local_credit=False), full, rtol=1e-4, atol=1e-5)
    assert (local - full).abs().max() > 1e-3  # later tokens do carry credit: the two paths differ


def test_local_credit_survives_checkpointing_and_leaves_the_model_as_it_was(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    trajectories = _trajectories(model, tokenizer)
    weights = torch.linspace(-1.0, 1.0, len(trajectories))
    local, _ = _brute_force(model, trajectories, weights)
    checkpointed = _gate_gradient(model, trajectories, weights, local_credit=True, limits=MemoryLimits(checkpoint_blocks=True))
    torch.testing.assert_close(checkpointed, local, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert not any("ipg_original_attention" in vars(module) for module in model.modules())


def test_attention_it_cannot_reproduce_is_refused_by_name(tiny_model, tokenizer):
    model = tiny_model("bloom", num_hidden_layers=3)  # ALiBi: a position bias outside the attention interface
    trajectories = _trajectories(model, tokenizer)
    with pytest.raises(LocalCreditError, match="credit: local .*Bloom"):
        _gate_gradient(model, trajectories, torch.ones(len(trajectories)), local_credit=True)
    assert model.config._attn_implementation == "eager"
