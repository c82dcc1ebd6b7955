import warnings

import lightning as L
import pytest
import torch

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.attribution.estimator import group_advantages, quadrature, surrogate_weights
from ipg_lightning.attribution.report import UninformativeReportError
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.rewards.functions import CompoundReward, reasoning_length
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.zoo.tiny import tiny_causal_lm, tiny_tokenizer

DIGITS = [str(d) for d in range(10)]


def digit_fraction(completion):
    """A reward that varies even for a random model: the share of digits in the completion."""
    return sum(ch.isdigit() for ch in completion.text) / max(len(completion.text), 1)


def has_digit(completion):
    return float(any(ch.isdigit() for ch in completion.text))


def word_count(completion):
    """A length reward: the number of whitespace-separated words (varies a lot between random samples)."""
    return float(len(completion.text.split()))


def starts_with_digit(completion):
    return float(completion.text[:1].isdigit())


def _data(num_val=4, batch_size=2, **kwargs):
    return ReasoningDataModule(
        num_train=0, num_val=num_val, num_test=0, batch_size=batch_size, template=PromptTemplate(use_chat_template=False), **kwargs
    )


def _run(model, tokenizer, data, sampling=None, **kwargs):
    """Attribute with test sampling settings (full temperature, 10 tokens, N = 4) updated by ``sampling``."""
    sampling = SamplingConfig(**{"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "num_samples": 4, **(sampling or {})})
    module = IPGAttribution.for_model(model, tokenizer, **{"reward": digit_fraction, **kwargs}, sampling=sampling)
    trainer = L.Trainer(inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.validate(module, datamodule=data, verbose=False)
    return module.report


def _planted_model(neuron=5, target_p=0.5):
    """Tiny Llama where MLP neuron `neuron` of block 1 pushes the next token towards digits."""
    model, tokenizer = tiny_causal_lm("llama", seed=3), tiny_tokenizer()
    digit_ids = tokenizer.convert_tokens_to_ids(DIGITS)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=generator)
    direction /= direction.norm()
    read = torch.randn(32, generator=generator)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight.mul_(0.1)
        model.lm_head.weight[digit_ids] += 0.8 * direction
        mlp.gate_proj.weight[neuron] = read  # silu(z) * z >= 0: the neuron only ever pushes one way
        mlp.up_proj.weight[neuron] = read
    prompts = [b for batch in _data(num_val=6).val_dataloader() for b in batch["prompt"]]
    encoded = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in prompts]

    def digit_probability(scale):
        with torch.no_grad():
            mlp.down_proj.weight[:, neuron] = scale * direction
            return sum(model(ids).logits[0, -1].softmax(-1)[digit_ids].sum().item() for ids in encoded) / len(encoded)

    low, high = 0.0, 200.0
    for _ in range(30):  # bisect the planted weight so that P(digit) is about target_p
        middle = (low + high) / 2
        low, high = (middle, high) if digit_probability(middle) < target_p else (low, middle)
    digit_probability(low)
    return model, tokenizer, digit_ids


def test_completeness_residual_shrinks_with_q_and_is_small_at_32(tiny_llama, tokenizer):
    residuals = []
    for steps in (2, 8, 32):
        report = _run(tiny_llama, tokenizer, _data(), families=["attn_head"], layers=[0], steps=steps, rule="midpoint")
        completeness = report.metadata.completeness
        residuals.append(abs(completeness.residual))
    assert residuals[0] > residuals[1] > residuals[2]
    # Bound: midpoint error is O(1/q^2); at q = 32 the residual is below 0.1 % of L(1) - L(0).
    assert completeness.relative_residual < 1e-3
    assert abs(completeness.surrogate_delta) > 1e-3  # the check is not vacuous


def test_right_rule_the_papers_also_converges(tiny_model, tokenizer):
    model = tiny_model("qwen2")
    relative = [
        _run(model, tokenizer, _data(), families=["mlp_neuron"], layers=[1], steps=q, rule="right").metadata.completeness.relative_residual
        for q in (4, 32)
    ]
    assert relative[1] < relative[0] and relative[1] < 0.05


@pytest.mark.parametrize("advantage", ["rloo", "grpo", "none"])
def test_planted_neuron_is_ranked_first_with_positive_sign(advantage):
    model, tokenizer, _ = _planted_model(neuron=5)
    report = _run(
        model,
        tokenizer,
        _data(num_val=6, batch_size=3),
        families=["mlp_neuron"],
        layers=[1],
        reward=starts_with_digit,
        sampling={"max_new_tokens": 1, "num_samples": 8},
        steps=4,
        advantage=advantage,
    )
    ranked = report.ranked(signed=True)
    assert ranked[0][0] == "blocks.1.mlp.hook_post[5]"
    assert ranked[0][1] > 0
    assert ranked[0][1] > 2 * abs(ranked[1][1])


def _exact_integrated_gradients(model, tokenizer, prompts, digit_ids, steps):
    """IG of the exact expected reward J(c) = mean over prompts of P_c(first token is a digit)."""
    gates = ComponentGates.for_model(model, ["mlp_neuron"], layers=[1])
    site = next(iter(gates.sites))
    total = torch.zeros(64, dtype=torch.float64)
    alphas, weights = quadrature("right", steps)
    with gates.attach(model):
        for alpha, weight in zip(alphas, weights, strict=True):
            gates.set_site(site, alpha)
            gates.gate(site).grad = None
            expected = sum(
                model(torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]])).logits[0, -1].softmax(-1)[digit_ids].sum() for p in prompts
            ) / len(prompts)
            expected.backward()
            total += weight * gates.gate(site).grad.double()
    return total.float()


def test_resample_converges_to_integrated_gradients_of_the_exact_expectation():
    model, tokenizer, digit_ids = _planted_model(neuron=5)
    data = _data(num_val=4, batch_size=4)
    prompts = next(iter(data.val_dataloader()))["prompt"]
    exact = _exact_integrated_gradients(model, tokenizer, prompts, digit_ids, steps=4)
    errors = []
    for samples in (8, 256):
        report = _run(
            model,
            tokenizer,
            data,
            families=["mlp_neuron"],
            layers=[1],
            reward=starts_with_digit,
            sampling={"max_new_tokens": 1, "num_samples": samples, "batch_size": 512},
            steps=4,
            rule="right",  # the reference's points
            estimation="resample",
        )
        estimate = report.scores["blocks.1.mlp.hook_post"]
        errors.append(((estimate - exact).norm() / exact.norm()).item())
    assert errors[1] < errors[0]
    assert errors[1] < 0.1
    assert report.metadata.completeness.target == "J(1) - J(baseline)"


def test_same_seed_same_report_and_batch_size_does_not_matter(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    settings = dict(families=["attn_head", "mlp_neuron", "attn_out", "mlp_out"], layers=[0], steps=3)
    first = _run(model, tokenizer, _data(num_val=4, batch_size=2), **settings)
    again = _run(model, tokenizer, _data(num_val=4, batch_size=2), **settings)
    one_by_one = _run(model, tokenizer, _data(num_val=4, batch_size=1), **settings)
    other_seed = _run(model, tokenizer, _data(num_val=4, batch_size=2), sampling={"seed": 1}, **settings)
    assert first.scores["blocks.0.hook_attn_out"].shape == (1,)
    for name, scores in first.scores.items():
        assert torch.equal(scores, again.scores[name])
        torch.testing.assert_close(scores, one_by_one.scores[name], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(scores, other_seed.scores[name])


def test_memory_limits_keep_the_scores_and_the_report_records_the_peak(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    settings = dict(families=["mlp_neuron", "attn_head"], layers=[1], steps=3, chunk_size=16)
    plain = _run(model, tokenizer, _data(num_val=4, batch_size=2), **settings)
    bounded = _run(model, tokenizer, _data(num_val=4, batch_size=2), memory={"chunk_tokens": 30, "checkpoint_blocks": True}, **settings)
    for name, scores in plain.scores.items():
        torch.testing.assert_close(bounded.scores[name], scores, rtol=0, atol=1e-6)
    assert bounded.metadata.memory["chunk_tokens"] == 30 and plain.metadata.memory["chunk_tokens"] is None
    assert bounded.metadata.config["memory"] == {"chunk_tokens": 30, "checkpoint_blocks": True}
    assert plain.metadata.memory["peak_gb"] > 0.05  # the CPU process's resident set: torch alone holds more


def test_local_credit_runs_through_the_trainer_and_says_completeness_does_not_apply(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    settings = dict(families=["mlp_neuron"], layers=[1], steps=2)
    full = _run(model, tokenizer, _data(num_val=2, batch_size=2), **settings)
    local = _run(model, tokenizer, _data(num_val=2, batch_size=2), credit="local", **settings)
    name = "blocks.1.mlp.hook_post"
    assert not torch.allclose(local.scores[name], full.scores[name])
    assert torch.corrcoef(torch.stack([local.scores[name], full.scores[name]]))[0, 1] > 0  # same trajectories, part of the credit
    assert "credit: local" in local.metadata.completeness.note and "credit" not in full.metadata.completeness.note
    with pytest.raises(ValueError, match="credit must be full|local"):
        IPGAttribution.for_model(model, tokenizer, credit="global")


def odd_length(completion):
    """A coin-flip reward on a random model: 1 when the completion's text has odd length."""
    return float(len(completion.text) % 2)


def test_signal_retries_redraw_silent_groups_from_fresh_sample_indices(tiny_model, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    settings = dict(families=["mlp_neuron"], layers=[1], steps=2, reward=odd_length, sampling={"num_samples": 2})
    skipped = _run(model, tokenizer, _data(num_val=12, batch_size=6), **settings)
    redrawn = _run(model, tokenizer, _data(num_val=12, batch_size=6), signal_retries=4, **settings)
    silent_before, silent_after = skipped.metadata.counts.zero_signal_prompts, redrawn.metadata.counts.zero_signal_prompts
    assert silent_before >= 3 and silent_after < silent_before
    assert redrawn.metadata.counts.redrawn_groups == silent_before - silent_after
    assert redrawn.metadata.counts.redrawn_tokens > 0 and skipped.metadata.counts.redrawn_groups == 0
    assert not torch.allclose(redrawn.scores["blocks.1.mlp.hook_post"], skipped.scores["blocks.1.mlp.hook_post"])
    with pytest.raises(ValueError, match="signal_retries applies to method ipg or grad_x_act with estimation fixed"):
        IPGAttribution.for_model(model, tokenizer, signal_retries=2, estimation="resample")


def test_a_later_first_sample_continues_the_same_per_completion_draws(tiny_llama, tokenizer):
    prompts = ["What is 2+3?", "Start with 7."]
    config = SamplingConfig(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8)
    both = sample_trajectories(tiny_llama, tokenizer, prompts, SamplingConfig(**{**vars(config), "num_samples": 4}), [5, 9])
    later = sample_trajectories(tiny_llama, tokenizer, prompts, config, [5, 9], first_sample=2)
    assert later.sample_index == [2, 3, 2, 3]
    assert later.completion_ids == [both.completion_ids[row] for row in (2, 3, 6, 7)]


def test_grad_x_act_is_ipg_without_integration(tiny_llama, tokenizer):
    baseline = _run(tiny_llama, tokenizer, _data(), method="grad_x_act", families=["attn_head"], layers=[1], steps=10)
    single_point = _run(tiny_llama, tokenizer, _data(), families=["attn_head"], layers=[1], steps=1, rule="right")
    integrated = _run(tiny_llama, tokenizer, _data(), families=["attn_head"], layers=[1], steps=10)
    name = "blocks.1.attn.hook_z"
    assert vars(baseline.metadata.effective) == {"steps": 1, "rule": "right"}
    assert torch.equal(baseline.scores[name], single_point.scores[name])
    assert not torch.allclose(baseline.scores[name], integrated.scores[name])


def _manual_site_means(model, tokenizer, prompts, seeds, sampling, layer):
    """Per-row mean over generated tokens of MLP-neuron activations, one unpadded row at a time."""
    trajectories = sample_trajectories(model, tokenizer, prompts, sampling, seeds)
    projection = model.model.layers[layer].mlp.down_proj
    rows = []
    for row in range(len(trajectories)):
        prompt, completion = trajectories.prompt_ids[row], trajectories.completion_ids[row]
        captured = {}
        handle = projection.register_forward_pre_hook(lambda m, args, captured=captured: captured.update(h=args[0]))
        with torch.no_grad():
            model(torch.tensor([prompt + completion]))
        handle.remove()
        rows.append(captured["h"][0, len(prompt) - 1 + 1 : len(prompt) + len(completion)].mean(0))
    return trajectories, torch.stack(rows)


def test_activation_and_mean_diff_baselines_match_independent_computations(tiny_llama, tokenizer):
    data = _data(num_val=4, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    sampling = SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=10)
    trajectories, means = _manual_site_means(tiny_llama, tokenizer, batch["prompt"], batch["seed"].tolist(), sampling, layer=0)
    activation = _run(tiny_llama, tokenizer, data, method="activation", families=["mlp_neuron"], layers=[0])
    expected = means.abs().view(4, 4, -1).mean(1).mean(0)
    torch.testing.assert_close(activation.scores["blocks.0.mlp.hook_post"], expected, rtol=1e-4, atol=1e-5)

    rewards = torch.tensor([float(any(ch.isdigit() for ch in text)) for text in trajectories.completions]).view(4, 4)
    mixed = [p for p in range(4) if 0 < rewards[p].sum() < 4]
    assert mixed and len(mixed) < 4  # some prompts carry signal, some do not
    above = torch.zeros(4, 4, dtype=torch.bool)
    below = torch.zeros(4, 4, dtype=torch.bool)
    for p in mixed:  # by hand: within a mixed prompt, reward 1 is above its mean and reward 0 below
        above[p], below[p] = rewards[p] == 1, rewards[p] == 0
    mean_diff = _run(tiny_llama, tokenizer, data, method="mean_diff", reward=has_digit, families=["mlp_neuron"], layers=[0])
    assert mean_diff.metadata.counts.above_mean_trajectories == int(above.sum())
    assert mean_diff.metadata.counts.zero_signal_prompts == 4 - len(mixed)
    expected = means[above.flatten()].mean(0) - means[below.flatten()].mean(0)
    torch.testing.assert_close(mean_diff.scores["blocks.0.mlp.hook_post"], expected, rtol=1e-4, atol=1e-5)


def test_mean_diff_of_reasoning_length_contrasts_long_and_short_answers_to_the_same_prompt(tiny_llama, tokenizer):
    data = _data(num_val=4, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    sampling = SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=10)
    trajectories, means = _manual_site_means(tiny_llama, tokenizer, batch["prompt"], batch["seed"].tolist(), sampling, layer=0)
    lengths = torch.tensor([float(len(text.split())) for text in trajectories.completions]).view(4, 4)
    above = lengths > lengths.mean(1, keepdim=True)
    below = lengths < lengths.mean(1, keepdim=True)
    assert above.any() and below.any()
    report = _run(tiny_llama, tokenizer, data, method="mean_diff", reward=word_count, families=["mlp_neuron"], layers=[0])
    expected = means[above.flatten()].mean(0) - means[below.flatten()].mean(0)
    torch.testing.assert_close(report.scores["blocks.0.mlp.hook_post"], expected, rtol=1e-4, atol=1e-5)


def test_component_values_of_heads_are_slice_norms(tiny_llama):
    site = ComponentGates.for_model(tiny_llama, ["attn_head"], layers=[0]).sites["blocks.0.attn.hook_z"]
    activation = torch.zeros(1, 1, 32)
    activation[0, 0, 8:16] = 3.0 / (8**0.5)
    assert site.component_values(activation)[0, 0].tolist() == pytest.approx([0.0, 3.0, 0.0, 0.0])


def test_ig_of_reference_likelihood_is_complete_and_random_is_seeded(tiny_llama, tokenizer):
    report = _run(tiny_llama, tokenizer, _data(), method="ig_reference", families=["attn_head"], layers=[0], steps=32, rule="midpoint")
    assert report.metadata.completeness.relative_residual < 1e-3
    assert report.metadata.counts.trajectories == 4  # one reference solution per prompt
    first = _run(tiny_llama, tokenizer, _data(), method="random", families=["attn_head"], layers=[0, 1])
    again = _run(tiny_llama, tokenizer, _data(), method="random", families=["attn_head"], layers=[0, 1])
    other = _run(tiny_llama, tokenizer, _data(), method="random", families=["attn_head"], layers=[0, 1], sampling={"seed": 7})
    assert torch.equal(first.scores["blocks.1.attn.hook_z"], again.scores["blocks.1.attn.hook_z"])
    assert not torch.equal(first.scores["blocks.1.attn.hook_z"], other.scores["blocks.1.attn.hook_z"])


def test_a_run_where_no_prompt_carries_signal_is_refused_not_written(tmp_path, tiny_llama, tokenizer):
    module = IPGAttribution.for_model(
        tiny_llama,
        tokenizer,
        reward=lambda c: 1.0,
        families=["attn_head"],
        layers=[0],
        steps=2,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=10),
        output_dir=str(tmp_path / "report"),
    )
    with pytest.raises(UninformativeReportError, match="none of the 4 support prompts carried signal.*No report was written"):
        run_attribution(module, _data(), enable_progress_bar=False)
    assert not (tmp_path / "report").exists()
    report = module.report  # kept in memory for inspection, marked so that nothing selects from it
    assert report.metadata.counts.zero_signal_prompts == 4
    assert torch.all(report.scores["blocks.0.attn.hook_z"] == 0)
    with pytest.raises(UninformativeReportError, match="carried signal"):
        report.select(k=2)


def test_default_layer_is_three_quarters_deep_and_bad_options_are_named(tiny_model, tokenizer):
    module = IPGAttribution.for_model(tiny_model(num_hidden_layers=4), tokenizer)
    assert list(module.gates.sites) == ["blocks.2.hook_resid_post"]
    with pytest.raises(ValueError, match="Unknown method 'ipgg'"):
        IPGAttribution(method="ipgg")
    with pytest.raises(ValueError, match="baseline must be < 1"):
        IPGAttribution(baseline=1.0)
    with pytest.raises(ValueError, match="Unknown reward"):
        IPGAttribution(reward="acuracy")


def test_inference_mode_is_refused_with_a_clear_message(tiny_llama, tokenizer):
    module = IPGAttribution.for_model(
        tiny_llama,
        tokenizer,
        sampling=SamplingConfig(max_new_tokens=4),
    )
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer.validate(module, datamodule=_data(), verbose=False)


def test_gates_stay_float32_under_a_half_precision_trainer(tiny_llama, tokenizer):
    module = IPGAttribution.for_model(
        tiny_llama,
        tokenizer,
        reward=digit_fraction,
        families=["attn_head"],
        layers=[0],
        steps=2,
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, top_p=1.0),
    )
    trainer = L.Trainer(
        inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", precision="bf16-true"
    )
    trainer.validate(module, datamodule=_data(), verbose=False)
    assert module.gates.gate("blocks.0.attn.hook_z").dtype == torch.float32
    assert next(tiny_llama.parameters()).dtype == torch.bfloat16  # the model itself did run in bf16
    assert torch.isfinite(module.report.scores["blocks.0.attn.hook_z"]).all()


def _hand_token_mean_surrogate(model, tokenizer, batch, sampling, gate):
    """``L(c) = sum_r A_r / (N |tau_r|) sum_t log pi_c(a_t^r)`` with block 1's attention output scaled by a
    hand hook, one unpadded row at a time; returns L and dL/dc summed over prompts."""
    trajectories = sample_trajectories(model, tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
    n = sampling.num_samples
    rewards = torch.tensor([word_count(type("C", (), {"text": text})) for text in trajectories.completions]).view(-1, n)
    advantages = (rewards - (rewards.sum(1, keepdim=True) - rewards) / (n - 1)) * (rewards.amax(1) > rewards.amin(1))[:, None]
    scale = torch.tensor(gate, requires_grad=True)
    handle = model.model.layers[1].self_attn.register_forward_hook(lambda m, args, out: (out[0] * scale, *out[1:]))
    total = torch.zeros(())
    try:
        for row, advantage in enumerate(advantages.flatten().tolist()):
            prompt, completion = trajectories.prompt_ids[row], trajectories.completion_ids[row]
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            log_likelihood = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum()
            total = total + advantage / (n * len(completion)) * log_likelihood
    finally:
        handle.remove()
    total.backward()
    return total.item(), scale.grad.item()


def test_token_mean_surrogate_is_integrated_gradients_of_the_length_normalised_likelihood(tiny_llama, tokenizer):
    data = _data(num_val=4, batch_size=4)
    batch = next(iter(data.val_dataloader()))
    stops = ("a", "e", "o", "1")  # completions of several lengths, so each trajectory's own length counts
    sampling = SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=10, stop_strings=stops)
    lengths = {len(ids) for ids in sample_trajectories(tiny_llama, tokenizer, batch["prompt"], sampling, batch["seed"].tolist()).completion_ids}
    assert len(lengths) > 2
    settings = dict(families=["attn_out"], layers=[1], reward=word_count, surrogate="token_mean", sampling={"stop_strings": stops})
    single = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), method="grad_x_act", **settings)
    value_at_one, gradient_at_one = _hand_token_mean_surrogate(tiny_llama, tokenizer, batch, sampling, 1.0)
    prompts = len(batch["prompt"])
    # grad_x_act: one point at alpha = 1, (1 - c') dL/dc, the mean over prompts
    assert single.scores["blocks.1.hook_attn_out"].item() == pytest.approx(gradient_at_one / prompts, rel=1e-4, abs=1e-7)
    assert abs(gradient_at_one) > 1e-4  # not vacuous
    integrated = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), steps=16, rule="gauss_legendre", **settings)
    value_at_zero, _ = _hand_token_mean_surrogate(tiny_llama, tokenizer, batch, sampling, 0.0)
    completeness = integrated.metadata.completeness
    assert completeness.surrogate_delta == pytest.approx((value_at_one - value_at_zero) / prompts, rel=1e-4)
    assert completeness.relative_residual < 1e-3
    summed = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), steps=16, rule="gauss_legendre", **{**settings, "surrogate": "sum"})
    assert summed.metadata.completeness.surrogate_delta != pytest.approx(completeness.surrogate_delta, rel=0.05)
    assert integrated.metadata.config["surrogate"] == "token_mean"
    with pytest.raises(ValueError, match="surrogate token_mean applies to method ipg or grad_x_act with estimation fixed"):
        IPGAttribution.for_model(tiny_llama, tokenizer, surrogate="token_mean", estimation="resample")
    with pytest.raises(ValueError, match="surrogate token_mean applies"):
        IPGAttribution.for_model(tiny_llama, tokenizer, surrogate="token_mean", method="mean_diff")
    with pytest.raises(ValueError, match="surrogate token_mean needs advantages that sum to zero within each prompt"):
        IPGAttribution.for_model(tiny_llama, tokenizer, surrogate="token_mean", advantage="none")
    with pytest.raises(ValueError, match="Unknown surrogate 'mean'"):
        IPGAttribution.for_model(tiny_llama, tokenizer, surrogate="mean")


def test_auto_surrogate_is_token_mean_for_length_rewards_where_it_applies_and_the_report_records_it(tiny_llama, tokenizer):
    stops = ("a", "e", "o", "1")  # completions of several lengths, so a length reward has signal
    settings = dict(families=["attn_out"], layers=[1], reward="reasoning_length", steps=2, sampling={"stop_strings": stops})
    auto = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), **settings)
    token_mean = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), surrogate="token_mean", **settings)
    summed = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), surrogate="sum", **settings)
    site = "blocks.1.hook_attn_out"
    assert auto.metadata.config["surrogate"] == "token_mean" and summed.metadata.config["surrogate"] == "sum"
    torch.testing.assert_close(auto.scores[site], token_mean.scores[site], rtol=0, atol=0)
    assert auto.scores[site].item() != pytest.approx(summed.scores[site].item(), rel=0.05)

    def chosen(**kwargs) -> str:
        return IPGAttribution.for_model(tiny_llama, tokenizer, **kwargs).settings.surrogate

    assert chosen(reward={"accuracy": 1.0, "reasoning_length": -0.01}) == "token_mean"
    assert chosen(reward="ipg_lightning.rewards:reasoning_length") == chosen(reward=reasoning_length) == "token_mean"
    assert chosen(reward=CompoundReward({"accuracy": 1.0, "ipg_lightning.rewards.functions:reasoning_length": -0.01})) == "token_mean"
    assert chosen(method="grad_x_act", reward="reasoning_length") == "token_mean"
    # the reward does not name length, or token_mean does not apply: the paper's sum, not an error
    assert chosen() == chosen(reward={"accuracy": 1.0, "reasoning_length": 0.0}) == chosen(reward=word_count) == "sum"
    assert chosen(reward="reasoning_length", estimation="resample") == chosen(reward="reasoning_length", advantage="none") == "sum"
    assert chosen(reward="reasoning_length", method="mean_diff") == chosen(reward="reasoning_length", method="random") == "sum"
    with pytest.raises(ValueError, match=r"Unknown surrogate 'mean'; choose from \['auto', 'sum', 'token_mean'\]"):
        chosen(surrogate="mean")


def test_an_attribution_whose_support_prompts_mostly_carry_no_signal_suggests_signal_retries(tiny_llama, tokenizer):
    def first_prompt_length(completion) -> float:  # signal on the first prompt scored only: the other three are silent
        chosen.setdefault("prompt", completion.prompt)
        return float(completion.num_tokens) if completion.prompt == chosen["prompt"] else 0.0

    settings = dict(families=["attn_out"], layers=[1], reward=first_prompt_length, steps=2, sampling={"stop_strings": ("a", "e", "o", "1")})
    chosen = {}
    with pytest.warns(UserWarning, match=r"3 of 4 support prompts carried no signal \(all 4 rewards equal\).*signal_retries: 4 redraws such groups"):
        report = _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), **settings)
    assert report.metadata.counts.zero_signal_prompts == 3
    for quiet in ({"signal_retries": 1}, {"method": "mean_diff"}):  # retries already on; a method that cannot redraw
        chosen = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*carried no signal.*")
            assert _run(tiny_llama, tokenizer, _data(num_val=4, batch_size=4), **{**settings, **quiet}).metadata.counts.zero_signal_prompts == 3


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_token_mean_weights_cancel_a_drop_that_is_the_same_at_every_token(advantage):
    """A change lowering every token's log-probability by d moves the sum surrogate by d sum_r w_r |tau_r|, the token mean one not at all."""
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 60, (5, 4), generator=generator).float()
    lengths = (rewards.flatten() + torch.randint(1, 9, (20,), generator=generator)).int().tolist()  # longer traces, higher reward
    advantages = group_advantages(rewards, advantage)[0].flatten()
    drop = 0.13 * torch.tensor(lengths, dtype=torch.float64)  # log pi_1(tau_r) - log pi_0(tau_r)
    per_token = (surrogate_weights(advantages, lengths, 4, "token_mean").double() * drop).sum()
    summed = (surrogate_weights(advantages, lengths, 4, "sum").double() * drop).sum()
    assert per_token.item() == pytest.approx(0.0, abs=1e-5)
    assert summed.item() > 1.0  # the length term: positive for a length-like reward
