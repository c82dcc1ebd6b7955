"""The localisation benchmark's code paths at tiny sizes, so that the benchmark cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK
from ipg_lightning.trajectories import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]


def _localisation(*args: str) -> str:
    command = [sys.executable, str(ROOT / "benchmarks" / "localisation.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout


def test_localisation_runs_every_kind_of_row_and_redraws_the_same_tables(tmp_path):
    out = tmp_path / "localisation"
    sizes = ["--seeds", "2", "--ps", "1", "2", "--support", "16", "--num-samples", "4", "--test", "8", "--steps", "2", "--gammas", "0", "1"]
    printed = _localisation(*sizes, "--methods", "ipg", "random", "--ipg-variants", "local", "retries", "--out", str(out))
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"ipg", "random", "ipg [local]", "ipg [retries]"}
    for curves in summary["results"].values():
        assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for by_p in curves.values() for values in by_p.values())
    assert all(len(times) == 2 and min(times) > 0 for times in summary["attribution_seconds"].values())
    assert [row["gamma"] for row in summary["length_curve"]] == [0.0, 1.0] and set(summary["length_components"]) == {"ipg", "random"}
    # the base accuracy is the reasoner's own greedy accuracy on the first 8 problems of the stream
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    test = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=8, num_val=0, num_train=0, batch_size=128)
    test.connect(tokenizer)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128)
    assert summary["base"]["accuracy"] == evaluate_generations(model, tokenizer, test.test_dataloader(), greedy).metrics["accuracy"]
    redrawn = _localisation(*sizes, "--out", str(out), "--from-results")
    tables = printed[printed.index("\nbase accuracy") :]
    assert redrawn.strip() == tables.strip() and "| ipg [retries] |" in tables
    assert (out / "localisation.png").stat().st_size > 10_000
