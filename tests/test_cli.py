import json
from pathlib import Path

import pytest

from ipg_lightning.cli import main, run
from ipg_lightning.explorer import embedded_payload

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_demo_runs_every_stage_and_writes_a_complete_output(tmp_path, capsys):
    out = tmp_path / "demo"
    # The shipped reasoner (a random tiny model never solves a problem: its accuracy attribution is refused).
    run(
        [
            "demo",
            "--out_dir",
            str(out),
            "--support_prompts",
            "4",
            "--test_prompts",
            "4",
            "--steps",
            "2",
            "--learning_steps",
            "1",
            "--max_new_tokens",
            "64",
            "--k",
            "3",
            "--eval_samples",
            "2",
            "--sae_steps",
            "2",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["conditions"]) == [
        "base",
        "accuracy suppressed",
        "accuracy amplified",
        "length suppressed",
        "length amplified",
        "length learned",
        "accuracy suppr. (SAE)",
        "length suppr. (SAE)",
        "length learned (SAE)",
    ]
    assert summary["export"]["greedy_generations_identical"] is True
    sae = summary["sae"]
    assert sae["site"] == "blocks.2.hook_resid_post.sae" and len(sae["selected"]["length"]) == 3
    assert sae["export"] == {"folded_sites": [], "loader_sites": ["blocks.2.hook_resid_post.sae"], "greedy_generations_identical": True}
    assert summary["site"] == "blocks.3.mlp.hook_post"  # the last block of the 4-block reasoner
    assert set(summary["learned_gates"]) == set(summary["selected"]["length"])
    assert len(summary["selected"]["accuracy"]) == 3
    for name in ("attribution_accuracy", "attribution_length", "attribution_length_sae", "exported_learned", "exported_learned_sae"):
        assert (out / name).is_dir()
    assert len((out / "generations.jsonl").read_text().splitlines()) == 9 * 4 * 2  # 2 sampled completions each
    # an explorer page per attribution, with the demo's measured conditions that steered components of its sites
    neurons = ["accuracy suppressed", "accuracy amplified", "length suppressed", "length amplified", "length learned"]
    features = ["accuracy suppr. (SAE)", "length suppr. (SAE)", "length learned (SAE)"]
    for name, conditions in (
        ("attribution_accuracy", neurons),
        ("attribution_length", neurons),
        ("attribution_accuracy_sae", features),
        ("attribution_length_sae", features),
    ):
        payload = embedded_payload((out / f"{name}.html").read_text())
        assert [condition["label"] for condition in payload["effects"]["conditions"]] == conditions
        assert payload["effects"]["base"] == pytest.approx(summary["conditions"]["base"], rel=1e-4)
        assert len(payload["traces"]) == 50 and payload["limits"]["trajectories_total"] == 4 * 4
        assert (out / name / "trajectories.json").is_file()
    # the length page also shows a SEAL-style reflection vector built on the support problems, saved beside it
    from ipg_lightning.model.loading import load_model_and_tokenizer
    from ipg_lightning.vectors import load_vectors

    vectors = load_vectors(out / "reflection.safetensors", load_model_and_tokenizer("tiny-reasoner")[0])
    assert vectors.provenance["source"] == "reflection" and list(vectors.sites) == ["blocks.3.hook_resid_post"]
    assert summary["reflection_vector"]["norms"] == pytest.approx(vectors.norms())
    shown = embedded_payload((out / "attribution_length.html").read_text())["vectors"]
    assert list(shown) == ["reflection @ blocks.3.hook_resid_post"] and len(shown["reflection @ blocks.3.hook_resid_post"]["trajectory_means"]) == 16
    assert embedded_payload((out / "attribution_accuracy.html").read_text())["vectors"] == {}
    printed = capsys.readouterr().out
    assert "accuracy suppressed" in printed and "wall time" in printed and f"open {out}/attribution_length.html" in printed
    assert f"a reflection vector's direction ({out}/reflection.safetensors" in printed


def test_demo_names_unknown_presets():
    with pytest.raises(ValueError, match="smollm2"):
        run(["demo", "--preset", "smolm2"])


def test_demo_rejects_a_zero_count_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        run(["demo", "--model_path", "tiny:llama", "--k", "0", "--out_dir", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()


def test_cli_rejects_a_config_typo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--test_promts", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "ipg demo: error: unrecognized arguments: --test_promts 3 (--debug shows the traceback)"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files a user might point the CLI at by mistake."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ipg_lightning.zoo.tiny import tiny_causal_lm

    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("")
    (root / "latin1.csv").write_bytes("question,answer\ncaf\xe9 2+2,4\n".encode("latin-1"))
    (root / "notes.txt").write_text("2+2=4\n")
    (root / "report").mkdir()
    (root / "report" / "attribution.json").write_text('{"method": "ipg", "si')
    (root / "report" / "attribution.safetensors").write_bytes(b"\x00" * 10)
    (root / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    tiny_causal_lm("llama").save_pretrained(root / "no_tokenizer")
    config = AutoConfig.for_model(  # mixture-of-experts with fused expert weights: no single MLP down-projection
        "mixtral",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=128,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "moe")
    from ipg_lightning.zoo.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(root / "moe")
    (root / "taken").mkdir()
    return root


COMPONENT = '["blocks.0.mlp.hook_post[1]"]'
BAD_INPUTS = [  # (arguments, with {root} for the fixture's folder, what the one-line message must name)
    (["evaluate", "--data.source", "{root}/empty.jsonl"], "empty.jsonl is empty"),
    (["evaluate", "--data.source", "{root}/latin1.csv"], "latin1.csv is not UTF-8 text (byte 0xe9"),
    (["evaluate", "--data.source", "{root}/notes.txt"], "notes.txt: unsupported file type '.txt'"),
    (["evaluate", "--selection.components", '["blocks.0.mlp.hook_post[999]"]'], "'blocks.0.mlp.hook_post[999]' is out of range"),
    (["evaluate", "--selection.report", "{root}/report", "--selection.k", "2"], "attribution.json cannot be read"),
    (["evaluate", "--steering_checkpoint", "{root}/cut.ckpt"], "cut.ckpt cannot be read as a checkpoint"),
    (["evaluate", "--model_path", "{root}/no_tokenizer"], "no_tokenizer has no tokenizer"),
    (["evaluate", "--model_path", "{root}/moe", "--selection.components", COMPONENT], "its MLP (model.layers.0.mlp) is a mixture of experts"),
    (["evaluate", "--data.num_test", "-3"], "num_test must be >= 0 (or null for all rows of a file), got -3"),
    (["evaluate", "--data.num_test", "abc"], "--data.num_test: expected int, got 'abc'"),
    (["evaluate", "--data.batch_size", "0"], "batch_size must be >= 1, got 0"),
    (["evaluate", "--output_dir", "{root}/taken"], "taken already exists"),
    (["export", "--selection.components", COMPONENT, "--metrics", "{root}/missing.json", "--output_dir", "{root}/x"], "--metrics"),
    (
        ["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.rule", "simpson"],
        "--model.rule: expected one of 'right', 'left', 'midpoint', 'trapezoid', 'gauss_legendre', got 'simpson'",
    ),
    (["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.sampling.temperature", "0"], "temperature 0 (greedy decoding)"),
    (
        ["attribute", "--config", str(RECIPES / "attribute_tiny.yaml"), "--model.families", "[mlp_neurons]"],
        "--model.families: expected one of 'resid_post', 'mlp_neuron', 'attn_head', 'attn_out', 'mlp_out', 'expert_neuron'",
    ),
    (["demo", "--k", "0"], "k must be >= 1, got 0"),
]


@pytest.mark.parametrize("arguments, named", BAD_INPUTS, ids=lambda value: value if isinstance(value, str) else None)
def test_bad_input_gets_one_line_that_names_it(bad_inputs, tmp_path, monkeypatch, capsys, arguments, named):
    monkeypatch.chdir(tmp_path)
    arguments = [argument.replace("{root}", str(bad_inputs)) for argument in arguments]
    if arguments[0] == "evaluate" and "--output_dir" not in arguments:
        arguments += ["--output_dir", str(tmp_path / "out"), "--sampling.max_new_tokens", "4"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code in (1, 2)
    err = capsys.readouterr().err.strip()
    messages = [line for line in err.splitlines() if line.startswith("ipg ")]  # other lines: the weights' load bar
    assert len(messages) == 1 and "Traceback" not in err, err
    assert named in messages[0], err
    assert messages[0].startswith(f"ipg {arguments[0]}: error: ") and messages[0].endswith("(--debug shows the traceback)")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="k must be >= 1"):
        main(["demo", "--k", "0", "--debug"])
