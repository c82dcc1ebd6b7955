"""Additive steering vectors: the hook's effect against hand-built biases, composition with gates, files, and sources."""

import copy
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.identity import ModelMismatchError
from ipg_lightning.model.interventions import attached, installed_interventions
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering.vector_sources import NoContrastError, contrast_vectors, reflection_vectors, sae_direction_vectors, split_thoughts
from ipg_lightning.vectors import SteeringVectors, load_vectors, save_vectors
from ipg_lightning.vectors.files import read_vector_metadata
from ipg_lightning.vectors.folding import fold_vectors_into_biases
from ipg_lightning.zoo.tiny import TINY_FAMILIES, TINY_MOE_FAMILIES, random_sae

INPUT = torch.tensor([[5, 9, 2, 7, 1, 3]])


def _with_bias(model, path, bias, weight_scale=1.0):
    """A copy of ``model`` whose projection at ``path`` computes ``weight_scale * W x + bias`` (no hooks anywhere)."""
    copied = copy.deepcopy(model)
    old = copied.get_submodule(path)
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight * weight_scale)
        new.bias.copy_(bias)
    parent, _, name = path.rpartition(".")
    setattr(copied.get_submodule(parent), name, new)
    return copied


def _vectors(model, site_name, seed=0, alpha=1.5):
    family = {"hook_resid_post": "resid_post", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}[site_name.split(".")[-1]]
    vectors = SteeringVectors.for_model(model, [family], [int(site_name.split(".")[1])], alpha=alpha)
    vectors.set_vector(site_name, torch.randn(vectors.width, generator=torch.Generator().manual_seed(seed)))
    return vectors


# In a pre-norm block, what the MLP's down-projection adds is the last write into the block's output,
# so a vector added to the block output, or to the MLP's output, is a bias on that projection.
@pytest.mark.parametrize(
    ("site_name", "projection"),
    [
        ("blocks.0.hook_resid_post", "model.layers.0.mlp.down_proj"),
        ("blocks.1.hook_mlp_out", "model.layers.1.mlp.down_proj"),
        ("blocks.0.hook_attn_out", "model.layers.0.self_attn.o_proj"),
    ],
)
def test_a_vector_equals_a_hand_added_bias_in_forward_and_in_cached_generation(tiny_llama, site_name, projection):
    vectors = _vectors(tiny_llama, site_name)
    biased = _with_bias(tiny_llama, projection, vectors.alpha * vectors.vector(site_name).detach())
    with torch.no_grad():
        base = tiny_llama(INPUT).logits
        with vectors.attach(tiny_llama):
            steered = tiny_llama(INPUT).logits
            generated = tiny_llama.generate(INPUT, max_new_tokens=12, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(steered, biased(INPUT).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(steered, base, atol=1e-3)
        assert generated.tolist() == biased.generate(INPUT, max_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
        assert torch.equal(tiny_llama(INPUT).logits, base)  # detached on exit


def _added_after(model, layer, offset, added):
    """A hook (test-local, independent of the library's) adding ``added`` to block ``layer``'s output at positions >= ``offset``."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, offset:] += added
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return model.model.layers[layer].register_forward_hook(hook)


def test_a_vector_at_generated_positions_acts_at_each_decode_step_and_at_declared_completion_tokens(tiny_llama):
    from ipg_lightning.rollout.scoring import completion_log_probs
    from ipg_lightning.rollout.trajectories import Trajectories

    vectors = _vectors(tiny_llama, "blocks.0.hook_resid_post", alpha=6.0)
    vectors.positions = "generated"
    added = vectors.alpha * vectors.vector("blocks.0.hook_resid_post").detach()
    prompt = INPUT[0].tolist()
    with torch.no_grad():
        base = tiny_llama(INPUT).logits
        with vectors.attach(tiny_llama):
            generated = tiny_llama.generate(INPUT, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
            assert torch.equal(tiny_llama(INPUT).logits, base)  # a pass that declares no generated tokens is a prompt
        everywhere = _vectors(tiny_llama, "blocks.0.hook_resid_post", alpha=6.0)
        with everywhere.attach(tiny_llama):
            generated_everywhere = tiny_llama.generate(INPUT, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt) :].tolist()
        # by hand, without a cache: each next token from a full pass that adds the vector at the tokens generated so far
        by_hand = []
        for _ in range(10):
            handle = _added_after(tiny_llama, 0, len(prompt), added)
            logits = tiny_llama(torch.tensor([prompt + by_hand])).logits
            handle.remove()
            by_hand.append(int(logits[0, -1].argmax()))
        assert generated == by_hand and generated != generated_everywhere
        # teacher forcing over prompt and completion: the vector at the completion's tokens only
        trajectories = Trajectories([prompt], [generated], ["x"], [0], [0], pad_token_id=0)
        with vectors.attach(tiny_llama):
            steered = completion_log_probs(tiny_llama, trajectories)
        handle = _added_after(tiny_llama, 0, len(prompt), added)
        expected = completion_log_probs(tiny_llama, trajectories)
        handle.remove()
        torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions must be one of"):
        SteeringVectors.for_model(tiny_llama, positions="prompt")


def test_generated_position_vectors_keep_their_mode_in_files_never_fold_and_are_refused_by_the_vllm_engine(tiny_llama, tmp_path):
    from ipg_lightning.rollout.vllm_gates import EngineGateError, check_mirrorable

    vectors = _vectors(tiny_llama, "blocks.0.hook_mlp_out")
    vectors.positions = "generated"
    save_vectors(vectors, tmp_path / "generated.safetensors", tiny_llama, "tiny:llama")
    loaded = load_vectors(tmp_path / "generated.safetensors", tiny_llama)
    assert loaded.positions == "generated" and read_vector_metadata(tmp_path / "generated.safetensors")["positions"] == "generated"
    fold = fold_vectors_into_biases(tiny_llama, loaded, INPUT)
    assert fold.folded == [] and fold.carried is loaded  # a bias would act at the prompt's positions too
    with pytest.raises(EngineGateError, match="generated positions only are not applied inside the vLLM engine yet"):
        check_mirrorable(tiny_llama, [loaded])


def test_alpha_zero_changes_nothing_and_alpha_scales_linearly(tiny_llama):
    vectors = _vectors(tiny_llama, "blocks.0.hook_resid_post")
    vector = vectors.vector("blocks.0.hook_resid_post").detach()
    seen = {}
    handle = tiny_llama.model.layers[1].register_forward_pre_hook(lambda module, args: seen.update(h=args[0].clone()))
    with torch.no_grad():
        base = tiny_llama(INPUT).logits
        plain = seen["h"]
        for alpha in (0.0, 2.0, -3.0):
            vectors.alpha = alpha
            with vectors.attach(tiny_llama):
                logits = tiny_llama(INPUT).logits
            torch.testing.assert_close(seen["h"] - plain, alpha * vector.expand_as(plain))
            assert torch.equal(logits, base) == (alpha == 0)
    handle.remove()
    assert vectors.norms()["blocks.0.hook_resid_post"] == pytest.approx(3.0 * float(vector.norm()))


def test_a_vector_acts_the_same_on_a_peft_wrapped_model(tiny_llama):
    vectors = _vectors(tiny_llama, "blocks.1.hook_resid_post")
    biased = _with_bias(tiny_llama, "model.layers.1.mlp.down_proj", vectors.alpha * vectors.vector("blocks.1.hook_resid_post").detach())
    adapted = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: the adapter adds nothing yet
    with torch.no_grad(), vectors.attach(adapted):
        assert installed_interventions(adapted) == [vectors]
        torch.testing.assert_close(adapted(input_ids=INPUT).logits, biased(INPUT).logits, rtol=1e-5, atol=1e-5)
    assert installed_interventions(adapted) == []


@pytest.mark.parametrize("gates_first", [True, False])
def test_vectors_compose_with_gates_in_the_order_they_are_installed(tiny_llama, gates_first):
    vectors = _vectors(tiny_llama, "blocks.1.hook_mlp_out")
    gates = ComponentGates.for_model(tiny_llama, ["mlp_out"], layers=[1])
    gates.set_site("blocks.1.hook_mlp_out", 0.25)
    added = vectors.alpha * vectors.vector("blocks.1.hook_mlp_out").detach()
    # gate then vector: 0.25 * (W x) + a v; vector then gate: 0.25 * (W x + a v)
    biased = _with_bias(tiny_llama, "model.layers.1.mlp.down_proj", added if gates_first else 0.25 * added, weight_scale=0.25)
    first, second = (gates, vectors) if gates_first else (vectors, gates)
    with torch.no_grad(), first.attach(tiny_llama), second.attach(tiny_llama):
        assert installed_interventions(tiny_llama) == [first, second]
        torch.testing.assert_close(tiny_llama(INPUT).logits, biased(INPUT).logits, rtol=1e-5, atol=1e-5)


def test_bad_vectors_and_sites_are_refused_in_one_line(tiny_llama):
    with pytest.raises(ValueError, match=r"added at \['resid_post', 'attn_out', 'mlp_out'\] sites only, got families \['mlp_neuron'\]"):
        SteeringVectors.for_model(tiny_llama, ["mlp_neuron"], [0])
    vectors = SteeringVectors.for_model(tiny_llama, ["resid_post"], [0])
    with pytest.raises(ValueError, match=r"must have shape \(32,\).*got \(31,\)"):
        vectors.set_vector("blocks.0.hook_resid_post", torch.zeros(31))
    with pytest.raises(ValueError, match="non-finite"):
        vectors.set_vector("blocks.0.hook_resid_post", torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        vectors.alpha = float("inf")
    with pytest.raises(KeyError, match="No steering vector at 'blocks.1.hook_resid_post'"):
        vectors.vector("blocks.1.hook_resid_post")


def test_a_vector_file_round_trips_with_its_provenance_and_is_checked_against_the_model(tiny_llama, tiny_model, tmp_path):
    vectors = _vectors(tiny_llama, "blocks.1.hook_attn_out", alpha=-2.0)
    vectors.provenance = {"source": "manual", "note": "test"}
    path = save_vectors(vectors, tmp_path / "v.safetensors", tiny_llama, "tiny:llama")
    assert read_vector_metadata(path)["provenance"] == {"source": "manual", "note": "test"}
    loaded = load_vectors(path, tiny_llama)
    assert loaded.alpha == -2.0 and list(loaded.sites) == ["blocks.1.hook_attn_out"]
    assert torch.equal(loaded.vector("blocks.1.hook_attn_out"), vectors.vector("blocks.1.hook_attn_out").detach())
    with torch.no_grad(), vectors.attach(tiny_llama):
        expected = tiny_llama(INPUT).logits
    with torch.no_grad(), loaded.attach(tiny_llama):
        assert torch.equal(tiny_llama(INPUT).logits, expected)

    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; choose another file, or set overwrite"):
        save_vectors(loaded, path, tiny_llama, "tiny:llama")
    assert path.read_bytes() == before
    loaded.alpha = 5.0
    save_vectors(loaded, path, tiny_llama, "tiny:llama", overwrite=True)  # an earlier vector file: replaced
    assert read_vector_metadata(path)["alpha"] == 5.0
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    with pytest.raises(FileExistsError, match="is not a steering-vector file of this library, so overwrite does not replace it"):
        save_vectors(loaded, weights, tiny_llama, "tiny:llama", overwrite=True)
    assert set(load_file(str(weights))) == {"w"}
    before = path.read_bytes()
    with pytest.raises(ModelMismatchError, match="would mean other units"):
        load_vectors(path, tiny_model("llama", hidden_size=64, intermediate_size=128))
    save_file({"blocks.1.hook_attn_out": torch.zeros(32)}, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="is not a steering-vector file of this library"):
        load_vectors(tmp_path / "other.safetensors", tiny_llama)
    metadata = {"format": "ipg_lightning.steering_vectors", "version": "1", "width": "32", "alpha": "1.0", "provenance": "{}"}
    metadata |= {"sites": json.dumps({"blocks.1.hook_attn_out": vectors.sites["blocks.1.hook_attn_out"].description()})}
    metadata |= {"model": json.dumps(read_vector_metadata(path)["model"])}
    save_file({"blocks.1.hook_attn_out": torch.full((32,), float("inf"))}, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="non-finite values"):
        load_vectors(tmp_path / "bad.safetensors", tiny_llama)
    for key, value in {"sites": "[]", "model": "null", "provenance": "3", "alpha": "nan"}.items():
        save_file({"blocks.1.hook_attn_out": torch.zeros(32)}, str(tmp_path / "wrong.safetensors"), metadata=metadata | {key: value})
        with pytest.raises(ValueError, match=f"wrong.safetensors has damaged metadata .*{key}"):
            load_vectors(tmp_path / "wrong.safetensors", tiny_llama)
    (tmp_path / "damaged.safetensors").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_vectors(tmp_path / "damaged.safetensors", tiny_llama)


def _manual_completion_means(model, trajectories, layer):
    """Per row: the mean over its generated tokens of block ``layer``'s output, one unpadded row at a time."""
    rows = []
    for row in range(len(trajectories)):
        prompt, completion = trajectories.prompt_ids[row], trajectories.completion_ids[row]
        with torch.no_grad():
            hidden = model(torch.tensor([prompt + completion]), output_hidden_states=True).hidden_states[layer + 1]
        rows.append(hidden[0, len(prompt) : len(prompt) + len(completion)].mean(0))
    return torch.stack(rows)


def has_digit(completion):
    return float(any(ch.isdigit() for ch in completion.text))


def test_a_contrast_vector_is_the_difference_of_mean_activations_above_and_below_each_prompts_mean(tiny_llama, tokenizer):
    data = ReasoningDataModule(num_train=0, num_val=4, num_test=0, batch_size=4, template=PromptTemplate(use_chat_template=False))
    batch = next(iter(data.val_dataloader()))
    prompts, golds = batch["prompt"], batch["answer"]
    sampling = SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=10)
    vectors = contrast_vectors(tiny_llama, tokenizer, prompts, golds, has_digit, ["resid_post"], [0], sampling)

    trajectories = sample_trajectories(tiny_llama, tokenizer, prompts, sampling)  # the same draws: seeds follow the prompt texts
    rewards = torch.tensor([float(any(ch.isdigit() for ch in text)) for text in trajectories.completions]).view(4, 4)
    mixed = [p for p in range(4) if 0 < rewards[p].sum() < 4]
    assert mixed and len(mixed) < 4
    above, below = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    for p in mixed:
        above[p], below[p] = rewards[p] == 1, rewards[p] == 0
    means = _manual_completion_means(tiny_llama, trajectories, layer=0).view(4, 4, -1)
    # prompt by prompt (correct minus incorrect answers to the same problem), then averaged over the mixed prompts
    expected = torch.stack([means[p][above[p]].mean(0) - means[p][below[p]].mean(0) for p in mixed]).mean(0)
    torch.testing.assert_close(vectors.vector("blocks.0.hook_resid_post").detach(), expected, rtol=1e-4, atol=1e-5)
    pooled = means.flatten(0, 1)[above.flatten()].mean(0) - means.flatten(0, 1)[below.flatten()].mean(0)
    assert not torch.allclose(expected, pooled, atol=1e-4)  # pooling over prompts would mix in differences between problems
    assert vectors.provenance["source"] == "contrast" and vectors.provenance["reward"] == "has_digit"
    assert vectors.provenance["signal_prompts"] == len(mixed) and vectors.provenance["above_trajectories"] == int(above.sum())
    assert vectors.provenance["below_trajectories"] == int(below.sum())

    with pytest.raises(NoContrastError, match="got equal rewards, so there is nothing to contrast"):
        contrast_vectors(tiny_llama, tokenizer, prompts, golds, lambda completion: 1.0, ["resid_post"], [0], sampling)
    with pytest.raises(ValueError, match="num_samples >= 2 and temperature > 0"):
        contrast_vectors(tiny_llama, tokenizer, prompts, golds, has_digit, ["resid_post"], [0], SamplingConfig.greedy(8))


def test_a_reflection_vector_is_execution_minus_reflection_lines_of_the_reasoners_traces():
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH

    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)  # trained on traces that re-check some steps
    data = ReasoningDataModule(num_train=0, num_val=6, num_test=0, batch_size=6)
    data.connect(tokenizer)
    prompts = next(iter(data.dataloader("val")))["prompt"]
    sampling = SamplingConfig(num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=120)
    vectors = reflection_vectors(model, tokenizer, prompts, ["resid_post", "mlp_out"], [2], sampling, chunk_size=5)

    # independently: the text's lines (the tokenizer is one token per character), each line's mean of block 2's output
    trajectories = sample_trajectories(model, tokenizer, prompts, sampling)
    sides = {True: [], False: []}
    for row, text in enumerate(trajectories.completions):
        prompt, completion = trajectories.prompt_ids[row], trajectories.completion_ids[row]
        assert len(tokenizer.encode(text, add_special_tokens=False)) == len(text)
        with torch.no_grad():
            hidden = model(torch.tensor([prompt + completion]), output_hidden_states=True).hidden_states[3][0, len(prompt) :]
        start = 0
        for line in text.split("\n"):
            end = min(start + len(line) + 1, len(text))  # the line and its line break
            if line.strip():
                sides["wait" in line.lower() or "let me check" in line.lower()].append(hidden[start:end].mean(0))
            start = end
    assert sides[True] and sides[False]
    expected = torch.stack(sides[False]).mean(0) - torch.stack(sides[True]).mean(0)
    torch.testing.assert_close(vectors.vector("blocks.2.hook_resid_post").detach(), expected, rtol=1e-4, atol=1e-5)
    assert vectors.provenance["execution_thoughts"] == len(sides[False]) and vectors.provenance["reflection_thoughts"] == len(sides[True])
    assert vectors.vector("blocks.2.hook_mlp_out").detach().norm() > 0

    with pytest.raises(NoContrastError, match="hold no reflection thought"):
        reflection_vectors(model, tokenizer, prompts, ["resid_post"], [2], sampling, markers=["no such marker"])
    assert [t.reflection for t in split_thoughts(tokenizer, tokenizer.encode("1 + 2 = 3\nWait, 3.\n#### 3"), re.compile("Wait"))] == [
        False,
        True,
        False,
    ]


def test_an_sae_direction_is_its_decoder_row_at_the_point_the_sae_reads(tiny_llama):
    sae = random_sae(d_in=32, hook_name="blocks.1.hook_resid_pre", d_sae=64)
    vectors = sae_direction_vectors(tiny_llama, sae, [7])
    assert list(vectors.sites) == ["blocks.0.hook_resid_post"]  # resid_pre of block 1 is block 0's output
    row = sae.W_dec.detach()[7]
    torch.testing.assert_close(vectors.vector("blocks.0.hook_resid_post").detach(), row / row.norm())
    summed = sae_direction_vectors(tiny_llama, sae, [7, 9], unit=False)
    torch.testing.assert_close(summed.vector("blocks.0.hook_resid_post").detach(), sae.W_dec.detach()[[7, 9]].sum(0))
    assert summed.provenance == {"source": "sae", "sae": "blocks.1.hook_resid_pre", "features": [7, 9], "unit": False}
    with pytest.raises(ValueError, match=r"SAE features \[64\] do not exist: the SAE at blocks.1.hook_resid_pre has 64 features"):
        sae_direction_vectors(tiny_llama, sae, [64])
    scaled = random_sae(d_in=32, hook_name="blocks.1.hook_resid_post", normalization="constant_scale", input_scale=4.0)
    # what feature 7 adds to the model's activation at strength 1: decode(e_7) - decode(0), back in the model's scale
    one_hot = torch.zeros(1, scaled.d_sae)
    one_hot[0, 7] = 1.0
    added = (scaled.decode(one_hot) - scaled.decode(torch.zeros_like(one_hot)))[0].detach()
    torch.testing.assert_close(sae_direction_vectors(tiny_llama, scaled, [7], unit=False).vector("blocks.1.hook_resid_post").detach(), added)
    per_token = random_sae(d_in=32, hook_name="blocks.1.hook_resid_post", normalization="layer_norm")
    with pytest.raises(ValueError, match="normalises each token .layer_norm., so its directions have no fixed size: use unit"):
        sae_direction_vectors(tiny_llama, per_token, [7], unit=False)


def _completions(directory):
    return [json.loads(line)["completion"] for line in (directory / "generations.jsonl").read_text().splitlines()]


def test_ipg_vectors_builds_a_file_that_evaluate_applies_and_sweeps(tmp_path):
    from ipg_lightning.cli import run
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.sae import load_sae
    from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH

    file = tmp_path / "sae.safetensors"
    sae_args = ["--model_path", "tiny-reasoner", "--source", "sae", "--sae", TINY_REASONER_SAE_PATH]
    run(["vectors", "--output", str(file), *sae_args, "--features", "[3, 5]", "--alpha", "8"])
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    loaded = load_vectors(file, model)
    direction = load_sae(TINY_REASONER_SAE_PATH).W_dec.detach()[[3, 5]].sum(0)
    assert loaded.alpha == 8.0 and list(loaded.sites) == ["blocks.2.hook_resid_post"]
    torch.testing.assert_close(loaded.vector("blocks.2.hook_resid_post").detach(), direction / direction.norm())

    data = ["--data.num_test", "6", "--sampling.max_new_tokens", "24"]
    run(["evaluate", "--model_path", "tiny-reasoner", *data, "--output_dir", str(tmp_path / "base")])
    run(["evaluate", "--vectors", str(file), *data, "--output_dir", str(tmp_path / "steered")])  # the model and alpha 8 from the file
    run(["evaluate", "--vectors", str(file), "--alphas", "[8]", *data, "--output_dir", str(tmp_path / "sweep")])
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("base", "steered")}
    assert metrics["steered"]["steering"] | {"model": None} == {"kind": "vectors", "model": None, "vectors": str(file), "alpha": 8.0}
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [row["alpha"] for row in rows] == [0.0, 8.0]
    assert rows[0] == {"alpha": 0.0, **metrics["base"]["metrics"]} and rows[1] == {"alpha": 8.0, **metrics["steered"]["metrics"]}
    prompts = [json.loads(line) for line in (tmp_path / "steered" / "generations.jsonl").read_text().splitlines()]
    assert _completions(tmp_path / "steered") != _completions(tmp_path / "base")
    data_module = ReasoningDataModule(num_test=6)
    data_module.connect(tokenizer)
    by_hand = []
    with loaded.attach(model):  # by hand, in Python: the same completions
        for batch in data_module.dataloader("test"):
            by_hand += sample_trajectories(model, tokenizer, batch["prompt"], SamplingConfig.greedy(24), batch["seed"].tolist()).completions
    assert by_hand == [record["completion"] for record in prompts]

    with pytest.raises(ValueError, match="--alphas sweeps the strength of steering vectors: give the vector file"):
        run(["evaluate", "--model_path", "tiny-reasoner", "--alphas", "[1]", *data, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="one sweep at a time"):
        run(["evaluate", "--vectors", str(file), "--alphas", "[1]", "--gammas", "[0]", *data, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="alpha is the strength of steering vectors: give the vector file"):
        run(["evaluate", "--model_path", "tiny-reasoner", "--alpha", "2", *data, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ModelMismatchError, match="would mean other units"):
        run(["evaluate", "--model_path", "tiny:llama", "--vectors", str(file), *data, "--output_dir", str(tmp_path / "x")])
    with pytest.raises(FileExistsError, match="already exists"):
        run(["vectors", "--output", str(file), *sae_args, "--features", "[3]"])
    with pytest.raises(ValueError, match="--source sae needs the SAE directory"):
        run(["vectors", "--output", str(tmp_path / "y.safetensors"), "--model_path", "tiny-reasoner", "--source", "sae"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.safetensors").exists()


def test_ipg_vectors_builds_a_reflection_contrast_from_the_support_split(tmp_path):
    from ipg_lightning.cli import run
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH

    file = tmp_path / "reflection.safetensors"
    args = ["--model_path", "tiny-reasoner", "--source", "reflection", "--layers", "[2]", "--data.num_val", "4", "--sampling.max_new_tokens", "120"]
    run(["vectors", "--output", str(file), *args, "--sampling.num_samples", "2", "--alpha", "3", "--positions", "generated"])
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    loaded = load_vectors(file, model)
    data = ReasoningDataModule(num_val=4)
    data.connect(tokenizer)
    prompts = next(iter(data.dataloader("val")))["prompt"]
    sampling = SamplingConfig(num_samples=2, temperature=0.6, top_p=0.95, max_new_tokens=120)  # the command's sampling, N and length set
    expected = reflection_vectors(model, tokenizer, prompts, ["resid_post"], [2], sampling)
    torch.testing.assert_close(loaded.vector("blocks.2.hook_resid_post").detach(), expected.vector("blocks.2.hook_resid_post").detach())
    assert loaded.alpha == 3.0 and loaded.provenance["source"] == "reflection" and loaded.provenance["split"] == "val"
    assert loaded.positions == "generated"
    with pytest.raises(ValueError, match="needs at least one reflection marker"):
        run(["vectors", "--output", str(tmp_path / "x.safetensors"), *args, "--markers", "[]"])
    with pytest.raises(ValueError, match="never on the test split"):
        run(["vectors", "--output", str(tmp_path / "x.safetensors"), *args, "--split", "test"])
    with pytest.raises(ValueError, match="--sae and --features belong to --source sae; --source reflection"):
        run(["vectors", "--output", str(tmp_path / "x.safetensors"), *args, "--features", "[1]"])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("family", [*TINY_FAMILIES, *TINY_MOE_FAMILIES])
def test_folded_vectors_and_the_carried_rest_reproduce_the_hooked_model_after_a_plain_reload(tiny_model, family, tmp_path):
    model = tiny_model(family)
    vectors = SteeringVectors.for_model(model, ["resid_post", "attn_out", "mlp_out"], [0], alpha=2.0)
    generator = torch.Generator().manual_seed(1)
    for name in vectors.sites:
        vectors.set_vector(name, torch.randn(vectors.width, generator=generator))
    with torch.no_grad(), vectors.attach(model):
        expected = model(INPUT).logits
    fold = fold_vectors_into_biases(model, vectors, INPUT)
    assert sorted(fold.folded + list(fold.carried.sites if fold.carried else [])) == sorted(vectors.sites)
    model.save_pretrained(tmp_path)  # the config carries any bias flag the fold switched on
    reloaded = type(model).from_pretrained(tmp_path)  # plain Hugging Face loading: no library code
    with torch.no_grad(), attached(reloaded, fold.carried):
        torch.testing.assert_close(reloaded(INPUT).logits, expected, rtol=1e-4, atol=1e-4)
    if family in ("llama", "gpt2", "gpt_neox", "falcon", "opt"):  # writers with a bias, or a flag that gives them one: all fold
        assert fold.carried is None, fold
    if family == "gptj":  # its attention output projection can hold no bias; its MLP's can
        assert sorted(fold.folded) == ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]


def test_a_fold_that_would_not_be_exact_is_undone_and_everything_is_carried(tiny_model):
    model = tiny_model("granite", residual_multiplier=0.5)  # what the MLP writes is scaled: its bias is not the block's output
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    vectors = _vectors(model, "blocks.0.hook_resid_post")
    fold = fold_vectors_into_biases(model, vectors, INPUT)
    assert fold.folded == [] and fold.carried is vectors and fold.config_flags == []
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[name], state[name]) for name in state)
    assert model.config.mlp_bias is False and model.config.attention_bias is False
