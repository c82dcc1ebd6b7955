"""The vLLM engine against the Hugging Face engine, on the shipped tiny reasoner in float32, with real vLLM.

These run where vLLM is installed (the README's engine line; CI runs them in a second environment)
and are skipped elsewhere. One engine serves every test (it is kept between calls); the compiled
engine's test starts its own and runs last.
"""

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the README's engine line installs it)")

from ipg_lightning.attribution import IPGAttribution, run_attribution  # noqa: E402
from ipg_lightning.cli import run  # noqa: E402
from ipg_lightning.data import ReasoningDataModule  # noqa: E402
from ipg_lightning.gates.component_gates import ComponentGates  # noqa: E402
from ipg_lightning.model.interventions import installed_interventions  # noqa: E402
from ipg_lightning.model.loading import load_model_and_tokenizer  # noqa: E402
from ipg_lightning.rollout import vllm_engine  # noqa: E402
from ipg_lightning.rollout.sampling import sample_trajectories  # noqa: E402
from ipg_lightning.rollout.scoring import completion_log_probs  # noqa: E402
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories, VLLMSettings  # noqa: E402
from ipg_lightning.rollout.vllm_gates import EngineGateError, mirrored_gates  # noqa: E402
from ipg_lightning.vectors import SteeringVectors  # noqa: E402
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH, TINY_REASONER_TASK  # noqa: E402

PROMPTS = ["Q: 3 + 4 = ?\nA:", "Q: 12 + 30 - 5 = ?\nA:", "Q: 7 + 6 + 2 = ?\nA:"]
#: One selection per family (gates away from 1 change these completions); the SAE's features need its file.
SELECTIONS = {
    "resid_post": [f"blocks.1.hook_resid_post[{i}]" for i in range(0, 128, 3)],
    "mlp_neuron": [f"blocks.1.mlp.hook_post[{i}]" for i in range(0, 384, 2)],
    "attn_head": ["blocks.0.attn.hook_z[1]", "blocks.1.attn.hook_z[0]", "blocks.1.attn.hook_z[2]", "blocks.2.attn.hook_z[3]"],
    "attn_out": ["blocks.1.hook_attn_out"],
    "mlp_out": ["blocks.2.hook_mlp_out"],
    "sae_feature": [f"blocks.2.hook_resid_post.sae[{i}]" for i in range(0, 1024, 5)],
}
DATA = ["--data.num_test", "6", "--data.num_val", "2", "--data.num_train", "0", "--sampling.max_new_tokens", "40"]


@pytest.fixture(scope="module")
def reasoner():
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    return model, tokenizer


def _completions(directory: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in (directory / "generations.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", [None, *SELECTIONS])
def test_ipg_evaluate_greedy_completions_equal_the_hf_engines_for_every_family(tmp_path, family):
    outputs = {}
    for gamma in ["1", "0", "3"] if family else [None]:
        for engine in ("hf", "vllm"):
            directory = tmp_path / f"{engine}_{gamma}"
            steering = []
            if family:
                steering = ["--selection.components", json.dumps(SELECTIONS[family]), "--gamma", gamma]
                steering += ["--selection.saes", json.dumps([TINY_REASONER_SAE_PATH])] if family == "sae_feature" else []
            run(["evaluate", "--model_path", "tiny-reasoner", *DATA, *steering, "--sampling.engine", engine, "--output_dir", str(directory)])
            outputs[engine, gamma] = _completions(directory)
            recorded = json.loads((directory / "metrics.json").read_text())
            assert recorded["sampling"]["engine"] == engine
        assert outputs["vllm", gamma] == outputs["hf", gamma]
    if family:
        assert outputs["hf", "1"] != outputs["hf", "0"] or outputs["hf", "1"] != outputs["hf", "3"], "the gates changed nothing"


def test_an_export_that_carries_a_steering_file_samples_the_same_on_both_engines(tmp_path):
    components = SELECTIONS["resid_post"] + SELECTIONS["mlp_neuron"][:20] + SELECTIONS["sae_feature"]
    steering = ["--selection.components", json.dumps(components), "--selection.saes", json.dumps([TINY_REASONER_SAE_PATH]), "--gamma", "0"]
    run(["export", "--model_path", "tiny-reasoner", *steering, "--output_dir", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "steering.safetensors").exists()
    exported = sorted(path.name for path in (tmp_path / "exported").iterdir())
    completions = {}
    for engine in ("hf", "vllm"):
        model = ["--model_path", str(tmp_path / "exported")]
        run(["evaluate", *model, *DATA, "--sampling.engine", engine, "--output_dir", str(tmp_path / engine)])
        completions[engine] = _completions(tmp_path / engine)
    vllm_engine.stop_engine()  # removes the engine's view of the export, never the export
    run(["evaluate", "--model_path", "tiny-reasoner", *DATA, *steering, "--output_dir", str(tmp_path / "gated")])
    assert completions["vllm"] == completions["hf"] == _completions(tmp_path / "gated")
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == exported


def test_an_export_that_carries_steering_vectors_samples_the_same_on_both_engines(tmp_path):
    vectors = tmp_path / "sae.safetensors"
    sae = ["--source", "sae", "--sae", TINY_REASONER_SAE_PATH, "--features", "[3, 5]", "--alpha", "8"]  # at block 2's output
    run(["vectors", "--output", str(vectors), "--model_path", "tiny-reasoner", *sae])
    gated = [f"blocks.2.hook_resid_post[{i}]" for i in range(0, 128, 3)]
    steering = ["--selection.components", json.dumps(gated), "--gamma", "0.5", "--vectors", str(vectors)]
    run(["export", "--model_path", "tiny-reasoner", *steering, "--output_dir", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "steering_vectors.safetensors").exists()  # after hooked block-output gates: not folded
    completions = {}
    for engine in ("hf", "vllm"):
        run(["evaluate", "--model_path", str(tmp_path / "exported"), *DATA, "--sampling.engine", engine, "--output_dir", str(tmp_path / engine)])
        completions[engine] = _completions(tmp_path / engine)
    vllm_engine.stop_engine()
    run(["evaluate", "--model_path", "tiny-reasoner", *steering, *DATA, "--output_dir", str(tmp_path / "steered")])
    assert completions["vllm"] == completions["hf"] == _completions(tmp_path / "steered")


@pytest.mark.parametrize("gated", [False, True])
def test_log_probabilities_vllm_reports_equal_hf_teacher_forced_ones(reasoner, gated):
    from vllm import SamplingParams

    model, tokenizer = reasoner
    gates = ComponentGates.for_model(model, families=["mlp_neuron", "resid_post"], layers=[1])
    generator = torch.Generator().manual_seed(0)
    for name in gates.sites:
        gates.set_site(name, torch.rand(gates.gate(name).shape, generator=generator) * 2 if gated else 1.0)
    engine = vllm_engine.engine_for(model, VLLMSettings())
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * 4
    params = SamplingParams(temperature=1.0, max_tokens=48, logprobs=0, stop_token_ids=[tokenizer.eos_token_id], seed=None)
    with gates.attach(model), mirrored_gates(installed_interventions(model), engine.model):
        outputs = engine.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
    completion_ids = [list(output.outputs[0].token_ids) for output in outputs]
    trajectories = Trajectories(encoded, completion_ids, [""] * len(encoded), list(range(len(encoded))), [0] * len(encoded), tokenizer.pad_token_id)
    with torch.no_grad(), gates.attach(model):
        teacher_forced = completion_log_probs(model, trajectories)
    for row, output in enumerate(outputs):
        reported = torch.tensor([step[token].logprob for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids, strict=True)])
        torch.testing.assert_close(reported, teacher_forced[row, : len(reported)], atol=2e-5, rtol=0)
    assert len({tuple(ids) for ids in completion_ids}) > len(PROMPTS)  # sampled, not copies


def test_prompts_sampled_again_under_other_gates_are_not_served_from_the_prefix_cache(reasoner):
    model, tokenizer = reasoner
    worked = "".join(f"Q: {a} + {a + 1} = ?\nA: {a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}\n\n" for a in range(1, 9))
    prompts = [worked + question for question in PROMPTS]  # past vLLM's cache blocks (128 tokens on a CPU, 16 on a GPU)
    assert min(len(tokenizer(p)["input_ids"]) for p in prompts) > 256
    greedy = SamplingConfig.greedy(24)
    gates = ComponentGates.for_model(model, families=["attn_head"], layers=[0, 1], init=0.0)
    for gated in (False, True, False):
        with gates.attach(model) if gated else contextlib.nullcontext():
            on_vllm = sample_trajectories(model, tokenizer, prompts, replace(greedy, engine="vllm"))
            on_hf = sample_trajectories(model, tokenizer, prompts, greedy)
        assert on_vllm.completion_ids == on_hf.completion_ids


def test_steering_vectors_composed_with_gates_sample_the_same_greedy_tokens_on_both_engines(reasoner):
    model, tokenizer = reasoner
    generator = torch.Generator().manual_seed(0)
    gates = ComponentGates.for_model(model, families=["mlp_neuron"], layers=[1])
    gates.set_site("blocks.1.mlp.hook_post", torch.rand(gates.gate("blocks.1.mlp.hook_post").shape, generator=generator) * 2)
    vectors = SteeringVectors.for_model(model, families=["resid_post", "attn_out", "mlp_out"], layers=[1, 2], alpha=2.0)
    for name in vectors.sites:
        vectors.set_vector(name, torch.randn(vectors.width, generator=generator))
    greedy = SamplingConfig.greedy(max_new_tokens=40)
    plain = sample_trajectories(model, tokenizer, PROMPTS, greedy).completion_ids
    with gates.attach(model), vectors.attach(model):
        steered = {engine: sample_trajectories(model, tokenizer, PROMPTS, replace(greedy, engine=engine)).completion_ids for engine in ("hf", "vllm")}
    assert steered["vllm"] == steered["hf"] != plain


def test_sampled_calls_repeat_and_every_completion_ends_where_the_hf_rules_end_it(reasoner):
    model, tokenizer = reasoner
    config = SamplingConfig(num_samples=4, temperature=0.8, top_p=0.9, max_new_tokens=32, stop_strings=("=",), engine="vllm")
    first, again = (sample_trajectories(model, tokenizer, PROMPTS, config) for _ in range(2))
    assert first.completion_ids == again.completion_ids
    assert first.sample_index == [0, 1, 2, 3] * len(PROMPTS) and first.prompt_index == [p for p in range(3) for _ in range(4)]
    for ids in first.completion_ids:
        text = tokenizer.decode(ids)
        ended = ids[-1] == tokenizer.eos_token_id or text.endswith("=") or len(ids) == 32
        assert ended and "=" not in tokenizer.decode(ids[:-1])


def test_an_attribution_of_vllm_trajectories_equals_the_hf_path_on_the_same_trajectories(reasoner):
    model, tokenizer = reasoner
    sampled: list[Trajectories] = []

    def attribution(engine: str) -> IPGAttribution:
        sampling = SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=40, engine=engine)
        return IPGAttribution.for_model(model, tokenizer, reward="accuracy", families=["mlp_neuron", "resid_post"], layers=[1, 2], sampling=sampling)

    def data() -> ReasoningDataModule:
        return ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_train=0, num_val=4, num_test=0, batch_size=2)

    on_vllm = attribution("vllm")
    sample = on_vllm.sample
    on_vllm.sample = lambda batch, first_sample=0: sampled.append(sample(batch, first_sample)) or sampled[-1]
    vllm_report = run_attribution(on_vllm, data(), enable_progress_bar=False)
    replayed = iter(sampled)
    on_hf = attribution("hf")
    on_hf.sample = lambda batch, first_sample=0: next(replayed)
    hf_report = run_attribution(on_hf, data(), enable_progress_bar=False)
    assert next(replayed, None) is None and sampled
    for name, scores in vllm_report.scores.items():
        torch.testing.assert_close(scores, hf_report.scores[name], atol=1e-6, rtol=1e-5)
    assert any(scores.abs().sum() > 0 for scores in vllm_report.scores.values())


def test_attribute_steer_and_train_sae_run_with_the_vllm_engine(tmp_path):
    task = ["--data.synthetic_task", json.dumps({"min_steps": 1, "max_steps": 4, "max_operand": 9, "reflection_probability": 0.25, "seed": 0})]
    data = [*task, "--data.num_train", "4", "--data.num_val", "4", "--data.num_test", "0", "--data.batch_size", "2"]
    trainer = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"]
    trainer += ["--trainer.default_root_dir", str(tmp_path)]
    vllm = {"engine": "vllm", "num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 40}
    run(
        [
            "attribute",
            *["--config", str(Path(__file__).resolve().parents[1] / "recipes" / "attribute_tiny.yaml")],
            *["--model.model_path", "tiny-reasoner", "--model.reward", "reasoning_length", "--model.estimation", "resample"],
            *["--model.sampling", json.dumps(vllm), "--model.output_dir", str(tmp_path / "report"), *data],
        ]
    )
    assert json.loads((tmp_path / "report" / "attribution.json").read_text())["sampling"]["engine"] == "vllm"
    run(
        [
            "steer",
            *["--model.model_path", "tiny-reasoner", "--model.selection.components", json.dumps(SELECTIONS["attn_head"])],
            *["--model.objective", "policy_gradient", "--model.reward", "reasoning_length", "--model.sampling", json.dumps(vllm)],
            *data,
            *trainer,
        ]
    )
    run(
        [
            "train-sae",
            *["--model.model_path", "tiny-reasoner", "--model.hook_name", "blocks.1.hook_resid_post", "--model.expansion", "2"],
            *["--model.traces", json.dumps({**vllm, "num_samples": 1}), "--output_dir", str(tmp_path / "sae"), *data, *trainer],
        ]
    )
    assert (tmp_path / "sae" / "cfg.json").exists()


def test_starting_an_engine_leaves_the_random_states_as_they_were(reasoner):
    import random

    import numpy as np

    vllm_engine.stop_engine()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    vllm_engine.engine_for(reasoner[0], VLLMSettings())
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_model_without_a_directory_is_refused_in_one_line():
    from ipg_lightning.zoo.tiny import tiny_causal_lm, tiny_tokenizer

    with pytest.raises(ValueError, match="engine: hf"):
        sample_trajectories(tiny_causal_lm("llama"), tiny_tokenizer(), PROMPTS[:1], SamplingConfig(engine="vllm", max_new_tokens=4))


def test_the_probe_refuses_a_compiled_engine_whose_hooks_do_not_fire(reasoner):
    model, tokenizer = reasoner
    compiled = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=8, engine="vllm", vllm=VLLMSettings(enforce_eager=False))
    ungated = sample_trajectories(model, tokenizer, PROMPTS, compiled)
    assert ungated.completion_ids == sample_trajectories(model, tokenizer, PROMPTS, SamplingConfig.greedy(8)).completion_ids
    gates = ComponentGates.for_model(model, families=["mlp_neuron"], layers=[1], init=0.0)
    with gates.attach(model), pytest.raises(EngineGateError, match="enforce_eager: true"):
        sample_trajectories(model, tokenizer, PROMPTS, compiled)
    vllm_engine.stop_engine()
