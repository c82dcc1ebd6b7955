import pytest
import torch

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.sampling import InverseCDFSampler, sample_trajectories
from ipg_lightning.rollout.scoring import backward_weighted_log_likelihood, completion_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories
from ipg_lightning.zoo.tiny import tiny_causal_lm

PROMPTS = ["What is 2+3?", "Compute 12*4 now.", "x", "Start with 7. Add 5."]


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama")


def _config(**overrides):
    fields = dict(num_samples=3, temperature=1.0, top_p=0.95, max_new_tokens=16, batch_size=5)
    return SamplingConfig(**{**fields, **overrides})


def test_samples_do_not_depend_on_batch_composition(model, tokenizer):
    together = sample_trajectories(model, tokenizer, PROMPTS, _config())
    for index, prompt in enumerate(PROMPTS):
        alone = sample_trajectories(model, tokenizer, [prompt], _config(batch_size=1))
        rows = [r for r in range(len(together)) if together.prompt_index[r] == index]
        assert [together.completion_ids[r] for r in rows] == alone.completion_ids
    assert len({tuple(ids) for ids in together.completion_ids}) > len(PROMPTS)  # samples differ


@pytest.mark.parametrize("name", ["tiny-reasoner", "tiny:qwen2"])
def test_a_static_cache_samples_the_same_tokens_as_a_growing_one(name):
    lm, tokenizer = load_model_and_tokenizer(name)
    gates = ComponentGates.for_model(lm, ["mlp_neuron"], [1], init=0.5)  # gated generation too
    prompts = [f"Q: Start with {n}. Add 5. Add 3.\nA:" for n in range(4)]  # the reasoner's template
    settings = dict(num_samples=3, temperature=1.0, top_p=0.95, max_new_tokens=48, batch_size=12)
    with gates.attach(lm):
        grown = sample_trajectories(lm, tokenizer, prompts, SamplingConfig(**settings))
        static = sample_trajectories(lm, tokenizer, prompts, SamplingConfig(**settings, kv_cache="static"))
    assert static.completion_ids == grown.completion_ids
    if name == "tiny-reasoner":  # completions that end at different lengths: the rows finish while others go on
        assert len({len(ids) for ids in grown.completion_ids}) > 1
    with pytest.raises(ValueError, match="kv_cache must be dynamic or static"):
        SamplingConfig(kv_cache="paged")


def test_seeds_control_samples(model, tokenizer):
    first = sample_trajectories(model, tokenizer, PROMPTS[:2], _config(), prompt_seeds=[1, 2])
    again = sample_trajectories(model, tokenizer, PROMPTS[:2], _config(), prompt_seeds=[1, 2])
    other = sample_trajectories(model, tokenizer, PROMPTS[:2], _config(), prompt_seeds=[3, 4])
    assert first.completion_ids == again.completion_ids != other.completion_ids


def test_greedy_matches_transformers_generate(model, tokenizer):
    trajectories = sample_trajectories(model, tokenizer, PROMPTS[:1], _config(num_samples=1, temperature=0.0))
    prompt = torch.tensor([tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=1, pad_token_id=0)
    expected = expected[0, prompt.shape[1] :].tolist()
    if 1 in expected:
        expected = expected[: expected.index(1) + 1]
    assert trajectories.completion_ids[0] == expected


def test_completions_end_at_eos_inclusive(tokenizer, tiny_llama):
    with torch.no_grad():
        tiny_llama.lm_head.bias = None
        tiny_llama.lm_head.weight[1] += 50 * tiny_llama.lm_head.weight[40]  # make EOS (id 1) likely early
    trajectories = sample_trajectories(tiny_llama, tokenizer, PROMPTS, _config(max_new_tokens=30))
    ended = [ids for ids in trajectories.completion_ids if ids and ids[-1] == 1]
    assert ended, "the biased model should emit EOS"
    assert all(1 not in ids[:-1] for ids in trajectories.completion_ids)
    padded = trajectories.padded()
    assert padded["completion_mask"].sum().item() == trajectories.num_completion_tokens


def test_stop_strings_cut_completions_at_the_stop(model, tokenizer):
    plain = sample_trajectories(model, tokenizer, PROMPTS, _config(max_new_tokens=24, top_p=1.0))
    stop = next(c[3:5] for c in plain.completions if len(c) >= 5)
    stopped = sample_trajectories(model, tokenizer, PROMPTS, _config(max_new_tokens=24, top_p=1.0, stop_strings=(stop,)))
    hits = 0
    for before, after in zip(plain.completions, stopped.completions, strict=True):
        if stop in before:
            hits += 1
            assert after.endswith(stop) and stop not in after[:-1]
            assert before.startswith(after)
        else:
            assert after == before
    assert hits >= 1


def test_top_p_keeps_only_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    uniforms = torch.rand(2000, 1, generator=torch.Generator().manual_seed(0))
    chosen = InverseCDFSampler(uniforms, temperature=1.0, top_p=0.7)(None, scores.clone()).argmax(-1)
    assert set(chosen.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 never drawn
    assert (chosen == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised over the nucleus


def test_inverse_cdf_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    uniforms = torch.rand(20000, 1, generator=torch.Generator().manual_seed(1))
    chosen = InverseCDFSampler(uniforms, temperature=0.7, top_p=1.0)(None, logits.repeat(20000, 1)).argmax(-1)
    frequencies = torch.bincount(chosen, minlength=5).float() / 20000
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 0.7, -1), atol=0.01, rtol=0)
    # and exactly where u falls in the cumulative distribution
    cdf = torch.softmax(logits[0] / 0.7, -1).cumsum(0)
    assert torch.equal(chosen, torch.bucketize(uniforms[:, 0], cdf, right=True).clamp(max=4))


def test_log_probs_match_an_independent_per_row_computation(model, tokenizer):
    trajectories = sample_trajectories(model, tokenizer, PROMPTS, _config())
    log_probs = completion_log_probs(model, trajectories)
    for row in range(len(trajectories)):
        prompt, completion = trajectories.prompt_ids[row], trajectories.completion_ids[row]
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        torch.testing.assert_close(log_probs[row, : len(completion)], expected, rtol=1e-4, atol=1e-4)
        assert torch.all(log_probs[row, len(completion) :] == 0)


def test_backward_reaches_only_gates_and_does_not_depend_on_chunking(model, tokenizer):
    trajectories = sample_trajectories(model, tokenizer, PROMPTS, _config())
    weights = torch.linspace(-1, 1, len(trajectories))
    gradients, values = [], []
    for chunk_size in (1, 5, len(trajectories)):
        gates = ComponentGates.for_model(model, ["resid_post", "attn_head"], layers=[0])
        with gates.attach(model):
            values.append(backward_weighted_log_likelihood(model, trajectories, weights, chunk_size))
        gradients.append(torch.cat([gates.gate(n).grad for n in gates.sites]))
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
    expected = (weights * completion_log_probs(model, trajectories).sum(-1)).sum().item()
    assert values == pytest.approx([expected] * 3, rel=1e-5)
    for gradient in gradients[1:]:
        torch.testing.assert_close(gradient, gradients[0], rtol=1e-4, atol=1e-5)
    assert gradients[0].abs().sum() > 0


def test_padding_layout():
    trajectories = Trajectories([[5, 6, 7], [8]], [[9], [10, 11, 1]], ["a", "b"], [0, 1], [0, 0], pad_token_id=0)
    padded = trajectories.padded()
    assert padded["input_ids"].tolist() == [[5, 6, 7, 9, 0, 0], [0, 0, 8, 10, 11, 1]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert padded["completion_mask"].tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3]]


def test_bad_sampling_settings_are_named(model, tokenizer):
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="num_samples"):
        SamplingConfig(num_samples=0)
    with pytest.raises(ValueError, match="2 prompt seeds for 1 prompts"):
        sample_trajectories(model, tokenizer, ["a"], _config(), prompt_seeds=[1, 2])
    with pytest.raises(ValueError, match="one weight per trajectory"):
        backward_weighted_log_likelihood(model, sample_trajectories(model, tokenizer, ["a"], _config()), torch.ones(2))
