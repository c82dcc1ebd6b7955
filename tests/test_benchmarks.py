"""The localisation benchmark's code paths at tiny sizes, so that the benchmark cannot rot."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--ps", "1", "2", "--support", "16", "--num-samples", "4", "--test", "8", "--steps", "2", "--gammas", "0", "1", "--length-k", "2"]


def _localisation(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "localisation.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _greedy_accuracy(task, num_test: int) -> float:
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    test = ReasoningDataModule(synthetic_task=task, num_test=num_test, num_val=0, num_train=0, batch_size=128)
    test.connect(tokenizer)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128)
    return evaluate_generations(model, tokenizer, test.test_dataloader(), greedy).metrics["accuracy"]


def test_localisation_measures_every_cell_resumes_and_redraws_the_same_tables(tmp_path):
    out = tmp_path / "localisation"
    run = [*SIZES, "--methods", "ipg", "mean_diff", "random", "--ipg-variants", "local", "--out", str(out)]
    _localisation(*run, "--seeds", "1", "--variant-methods", "ipg", "grad_x_act")
    summary = json.loads((out / "results.json").read_text())
    rows = {"ipg", "mean_diff", "random", "ipg [local]", "grad_x_act [local]"}
    assert summary["complete"] and set(summary["cells"]) == {f"{b}|{row}|0" for b in ("accuracy", "length") for row in rows}
    for key, cell in summary["cells"].items():
        assert cell["seconds"] > 0
        if key.startswith("accuracy"):
            assert len(cell["components"]) == 2 and all(0 <= v <= 1 for c in ("suppress", "amplify") for v in cell[c].values())
        else:  # gamma 1 is the base, measured once; mean_diff of length contrasts long and short answers
            assert len(cell["components"]) == 2 and list(cell["gammas"]) == ["0.0"]
    # the base accuracy is the reasoner's own greedy accuracy on the first 8 problems of the stream
    assert summary["base"]["greedy"]["accuracy"] == _greedy_accuracy(TINY_REASONER_TASK, 8)

    # the length-term diagnostic reads the run's length cells and removes each row's components
    bias = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "length_bias.py"), str(out), "--rows", "ipg", "random"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    table = [line.split("|")[1:-1] for line in bias.splitlines() if line.startswith("| ipg ") or line.startswith("| random ")]
    assert [cells[0].strip() for cells in table] == ["ipg", "random"]
    for cells in table:
        row, _, total, term, share, _, measured = (cell.strip() for cell in cells)
        assert float(measured) == pytest.approx(summary["cells"][f"length|{row}|0"]["gammas"]["0.0"]["reasoning_length_mean"], abs=0.05)
        assert float(share) == pytest.approx(float(term) / float(total), abs=0.01 + 1e-3 * abs(float(term) / float(total)))

    # a second seed of one row resumes: only its cell is measured, the first seed's are kept as they were, and
    # the saved settings keep every row of both runs, so the tables still show them and say what is missing
    resumed_run = [*run, "--seeds", "2", "--methods", "random", "--ipg-variants", "--behaviours", "accuracy"]
    resumed = _localisation(*resumed_run).stdout
    assert resumed.count("|0 ") == 0 and resumed.count("|1 ") == 1 and "accuracy|random|1 " in resumed
    again = json.loads((out / "results.json").read_text())
    assert set(again["cells"]) == set(summary["cells"]) | {"accuracy|random|1"}
    assert all(again["cells"][key] == cell for key, cell in summary["cells"].items())
    held = {key: again["settings"][key] for key in ("seeds", "behaviours", "methods", "ipg_variants", "variant_methods")}
    assert held == {**{key: summary["settings"][key] for key in held}, "seeds": 2} and not again["complete"]
    tables = resumed[resumed.index("\nsft testbed") :]
    assert "2 seeds (PARTIAL: 9 cells missing, e.g. accuracy|ipg|1)" in tables
    assert "| mean_diff |" in tables and "| grad_x_act [local] |" in tables and "mean reasoning length" in tables
    redrawn = _localisation(*run, "--seeds", "2", "--from-results").stdout  # the saved settings draw the tables
    assert redrawn.strip() == tables.strip()
    assert (out / "localisation.png").stat().st_size > 10_000

    # the engine cross-check lays a run over a reference: against itself (the resumed row's 2 seeds), every point lands
    crosscheck = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_crosscheck.py"), str(out), str(out)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "| NO |" not in crosscheck and "points within the reference's per-seed spread: 29 of 29 (100%)" in crosscheck
    assert "| random | components shared with the reference's seed | | | 2 of 2, 2 of 2 | |" in crosscheck

    # other measurement settings do not mix with the saved cells
    refused = _localisation(*run, "--seeds", "2", "--steps", "3", check=False)
    assert refused.returncode != 0 and "other settings (steps)" in refused.stderr and "--restart" in refused.stderr

    # transfer with the in-task rankings: the same components, measured on another task, without attributing again
    transfer = [*SIZES, "--methods", "ipg", "mean_diff", "--behaviours", "accuracy", "--seeds", "1", "--test-task", "products"]
    _localisation(*transfer, "--rankings-from", str(out), "--out", str(tmp_path / "transfer"))
    moved = json.loads((tmp_path / "transfer" / "results.json").read_text())
    for key in ("accuracy|ipg|0", "accuracy|mean_diff|0"):
        cell, source = moved["cells"][key], summary["cells"][key]
        assert cell["components"] == source["components"] and cell["seconds"] == source["seconds"] and cell["ranking_from"] == str(out)
    assert moved["base"]["greedy"]["accuracy"] == _greedy_accuracy(replace(TINY_REASONER_TASK, operations=("*",)), 8)  # measured on products
    refused = _localisation(*transfer, "--steps", "3", "--rankings-from", str(out), "--out", str(tmp_path / "t2"), check=False)
    assert refused.returncode != 0 and "ranked with other settings (steps)" in refused.stderr
    missing = _localisation(*transfer, "--methods", "activation", "--rankings-from", str(out), "--out", str(tmp_path / "t3"), check=False)
    assert missing.returncode != 0 and "has no cells accuracy|activation|0: measure them there first" in missing.stderr


def test_localisation_transfers_components_between_tasks_of_the_rl_testbed(tmp_path):
    out = tmp_path / "transfer"
    printed = _localisation(
        *SIZES,
        "--testbed",
        "rl",
        "--support-task",
        "products",
        "--test-task",
        "add_sub",
        "--methods",
        "ig_reference",
        "--behaviours",
        "accuracy",
        "--seeds",
        "1",
        "--out",
        str(out),
    ).stdout
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["cells"]) == {"accuracy|ig_reference|0"} and "selected on products" in printed
    model, tokenizer = load_model_and_tokenizer("tiny-reasoner-rl")
    test = ReasoningDataModule(synthetic_task=replace(TINY_REASONER_TASK, operations=("+", "-")), num_test=8, num_val=0, num_train=0, batch_size=128)
    test.connect(tokenizer)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128)
    assert summary["base"]["greedy"] == evaluate_generations(model, tokenizer, test.test_dataloader(), greedy).metrics


def test_placement_trains_each_mode_with_its_parameter_count_and_resumes(tmp_path):
    out = tmp_path / "placement"
    sizes = ["--steps", "1", "--batch-size", "2", "--test", "8", "--support", "4", "--max-new-tokens", "24", "--objectives", "right_but_shorter"]
    command = [sys.executable, str(ROOT / "benchmarks" / "placement.py"), *sizes, "--seeds", "1", "--out", str(out)]
    modes = ["--modes", "gates", "lora_random_layers", "weight_slices_random"]
    subprocess.run([*command, *modes], capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((out / "results.json").read_text())
    cells = summary["cells"]
    assert summary["complete"] and set(cells) == {f"right_but_shorter|{mode}|0" for mode in modes[1:]}
    # 8 gates; rank 8 on one block's gate/up (128 -> 384) and down (384 -> 128); 8 neurons x 3 x 128 weights
    assert [cells[f"right_but_shorter|{mode}|0"]["parameters"] for mode in modes[1:]] == [8, 12_288, 3_072]
    assert all(0 <= cell["sampled_accuracy"] <= 1 and cell["greedy_length"] > 0 for cell in cells.values())
    selected = summary["selection"]["right_but_shorter"]
    assert len(selected) == 8 and all(name.startswith("blocks.3.mlp.hook_post[") for name in selected)
    changed = subprocess.run([*command, "--steps", "2"], capture_output=True, text=True, cwd=ROOT)
    assert changed.returncode != 0 and "holds a run with other settings (steps)" in changed.stderr


def test_gates_vs_vectors_keeps_the_setting_chosen_on_the_selection_problems_and_measures_it_on_the_test_problems(tmp_path):
    from ipg_lightning.vectors import SteeringVectors

    out = tmp_path / "comparison"
    sizes = ["--support", "8", "--num-samples", "4", "--select", "8", "--test", "8", "--ks", "2", "--gammas", "0", "2", "--strengths", "-0.1", "0.1"]
    command = [sys.executable, str(ROOT / "benchmarks" / "gates_vs_vectors.py"), *sizes, "--seeds", "1", "--out", str(out)]
    rows = ["--rows", "grad_x_act", "contrast", "seal", "sae", "learned", "--learn-epochs", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    printed = subprocess.run([*command, *rows], capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout
    summary = json.loads((out / "results.json").read_text())
    base = summary["base"]
    assert set(summary["cells"]) == {f"{b}|{row}|0" for b in ("length", "accuracy") for row in rows[1:6]}
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=8, num_val=8, num_train=0, batch_size=128)
    data.connect(tokenizer)
    decoding = {  # accuracy greedy, length on 4 samples per problem
        "accuracy": SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128),
        "length": SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=128, seed=0),
    }
    for behaviour, sampling in decoding.items():
        metrics = evaluate_generations(model, tokenizer, data.test_dataloader(), sampling).metrics
        assert base[behaviour]["test"]["accuracy"] == metrics["accuracy"] and base[behaviour]["test"]["length"] == metrics["reasoning_length_mean"]
    for key, cell in summary["cells"].items():
        if "not_applicable" in cell:
            assert "|contrast|" in key or "|seal|" in key, cell  # only a contrast can lack one of its sides
            continue
        behaviour, row, _ = key.split("|")
        swept, reference = cell["select"], base[behaviour]["select"]
        assert len(swept) == (4 if row == "learned" else 2) and cell["build_seconds"] > 0
        if row == "learned":  # the learned vector is also tried at the norm it was trained to, both signs
            against, along = swept[-2:]
            assert against["as_trained"] and along["as_trained"] and along["alpha"] == -against["alpha"] > 0
            assert along["strength"] * base["norms"][next(iter(cell["vectors"]))] == pytest.approx(along["alpha"])
        allowed = [r for r in swept if r["accuracy"] >= reference["accuracy"] - 0.02 and r["length"] < reference["length"]]
        if behaviour == "accuracy":
            allowed = [r for r in swept if r["accuracy"] > reference["accuracy"]]
        if cell["kept"] is None:  # nothing qualified on the selection problems: the test row is the base
            assert not allowed and cell["test"] == base[behaviour]["test"]
        elif behaviour == "accuracy":
            assert cell["kept"]["accuracy"] == max(r["accuracy"] for r in allowed)
        else:
            assert cell["kept"]["length"] == min(r["length"] for r in allowed)
    # every vector cell, rebuilt by hand from its recorded unit direction at its kept strength, gives its recorded test metrics
    for key, cell in summary["cells"].items():
        if "vectors" not in cell:
            continue
        behaviour = key.split("|")[0]
        (name, direction), alpha = next(iter(cell["vectors"].items())), (cell["kept"] or {"alpha": 0.0})["alpha"]
        assert abs(float(torch.tensor(direction).norm()) - 1) < 1e-5
        vectors = SteeringVectors.for_model(model, ["resid_post"], [int(name.split(".")[1])], alpha=alpha, positions=cell["positions"])
        vectors.set_vector(name, torch.tensor(direction))
        metrics = evaluate_generations(model, tokenizer, data.test_dataloader(), decoding[behaviour], None, vectors).metrics
        assert (cell["test"]["accuracy"], cell["test"]["length"]) == (metrics["accuracy"], metrics["reasoning_length_mean"])
    assert "| grad_x_act | 1 |" in printed and "| sae | 1 |" in printed and "| learned | 1 |" in printed
