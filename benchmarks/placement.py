"""Does it matter where the fine-tune goes? Gates, localized LoRA, LoRA in random blocks, LoRA everywhere, weight slices.

On the shipped tiny reasoner, for each objective:

- ``accuracy``: reward 1 for a right answer; the components are IPG's top-k MLP neurons of block 2;
- ``right_but_shorter``: accuracy minus ``--length-penalty`` per reasoning token; IPG's top-k of block 3,

IPG ranks the neurons once on support problems (N=4, temperature 0.7) for that objective's reward.
Then each mode trains for the same number of policy-gradient steps (RLOO, N=4, temperature 0.7,
no KL term), from the same seeds:

- ``gates``: the k gates only (learning rate ``--gate-lr``);
- ``lora_localized``: a rank-r LoRA on the projections that host the k neurons (their block's MLP);
- ``lora_random_layers``: the same modules in a randomly chosen other block (the control: the same
  parameter count, none of the localisation);
- ``lora_everywhere``: rank r on every projection of every block;
- ``weight_slices``: only the k neurons' rows and columns of their MLP;
- ``weight_slices_random``: the same for k random neurons of the same block (the control for IPG's
  choice of neurons, where the LoRA control moves the block).

The fine-tune modes train no gates and share one learning rate (``--lr``). Each cell reports the
trainable parameter count, held-out greedy accuracy and length, and sampled (temperature 0.7)
accuracy and length, over ``--seeds`` seeds (training samples, adapter init, the random blocks) with
mean +- 1.96 s.e. Resumable: each finished cell is written to ``OUT/results.json`` at once.

Run: ``python benchmarks/placement.py`` (``--help`` for knobs); ``--from-results`` reprints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_write_json
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import ComponentSelection, GateSteering, LoraSettings
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK

OBJECTIVES = ("accuracy", "right_but_shorter")
MODES = ("gates", "lora_localized", "lora_random_layers", "lora_everywhere", "weight_slices", "weight_slices_random")
#: Settings a resumed run may change: which cells to measure, and where to write them.
NOT_MEASUREMENT = {"out", "from_results", "restart", "seeds", "modes", "objectives"}
METRICS = ("greedy_accuracy", "greedy_length", "sampled_accuracy", "sampled_length")


def reward_of(objective: str, length_penalty: float) -> dict[str, float]:
    """The objective's reward, as reward weights."""
    return {"accuracy": 1.0} if objective == "accuracy" else {"accuracy": 1.0, "reasoning_length": -length_penalty}


def data(settings: dict[str, Any], num_train: int = 0, support: int = 0) -> ReasoningDataModule:
    """The reasoner's task: the first ``test`` problems held out, then support, then training problems."""
    return ReasoningDataModule(
        source="synthetic",
        synthetic_task=TINY_REASONER_TASK,
        num_test=settings["test"],
        num_val=support,
        num_train=num_train,
        batch_size=settings["batch_size"],
    )


def sampling(settings: dict[str, Any], seed: int) -> SamplingConfig:
    """Training and attribution samples: N=4 at temperature 0.7."""
    return SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=settings["max_new_tokens"], batch_size=64, seed=seed)


def select(settings: dict[str, Any], objective: str) -> list[str]:
    """IPG's top-k MLP neurons of the objective's block for its reward, on the support problems."""
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    module = IPGAttribution.for_model(
        model,
        tokenizer,
        reward=reward_of(objective, settings["length_penalty"]),
        families=["mlp_neuron"],
        layers=[settings["layers"][objective]],
        rule="right",  # the rule its recorded runs used (the library's default before 2026-12-06)
        surrogate="sum",  # the surrogate its recorded runs used (the library's default before 2026-12-07)
        sampling=sampling(settings, 0),
        chunk_size=32,
    )
    return run_attribution(module, data(settings, support=settings["support"]), enable_progress_bar=False).select(k=settings["k"])


def mode_settings(mode: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``GateSteering`` arguments of one mode."""
    if mode == "gates":
        return {"learning_rate": settings["gate_lr"]}
    fine_tune: dict[str, Any] = {"weight_slices": True} if mode.startswith("weight_slices") else {}
    if mode.startswith("lora_"):
        fine_tune["lora"] = LoraSettings(r=settings["r"], alpha=2 * settings["r"], placement=mode.removeprefix("lora_"))
    return {**fine_tune, "train_gates": False, "learning_rate": settings["lr"]}


def evaluate(model: torch.nn.Module, tokenizer: Any, batches: list, gates: Any, settings: dict[str, Any]) -> dict[str, float]:
    """Held-out greedy and sampled accuracy and mean reasoning length."""
    greedy = SamplingConfig.greedy(settings["max_new_tokens"], 128)
    sampled = SamplingConfig(num_samples=2, temperature=0.7, top_p=1.0, max_new_tokens=settings["max_new_tokens"], batch_size=128, seed=0)
    result = {}
    for name, config in (("greedy", greedy), ("sampled", sampled)):
        metrics = evaluate_generations(model, tokenizer, batches, config, gates).metrics
        result[f"{name}_accuracy"], result[f"{name}_length"] = metrics["accuracy"], metrics["reasoning_length_mean"]
    return result


def train(settings: dict[str, Any], objective: str, mode: str, seed: int, components: list[str]) -> dict[str, Any]:
    """One cell: train ``mode`` for the objective from ``seed``, and evaluate it on the held-out problems."""
    started = time.perf_counter()
    if mode == "weight_slices_random":
        components = random_neurons(components, seed)
    L.seed_everything(seed, verbose=False)
    module = GateSteering(
        selection=ComponentSelection(components=tuple(components)),
        model_path=TINY_REASONER_PATH,
        reward=reward_of(objective, settings["length_penalty"]),
        sampling=sampling(settings, seed),
        **mode_settings(mode, settings),
    )
    datamodule = data(settings, num_train=settings["steps"] * settings["batch_size"])
    trainer = L.Trainer(
        max_steps=settings["steps"],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    trained = sum(parameter.numel() for name, parameter in module.named_parameters() if parameter.requires_grad and not name.startswith("gates."))
    parameters = len(components) if mode == "gates" else trained
    datamodule.connect(module.tokenizer)
    cell = evaluate(module.lm.eval(), module.tokenizer, list(datamodule.test_dataloader()), module.gates, settings)
    return {**cell, "parameters": parameters, "seconds": round(time.perf_counter() - started, 1)}


def random_neurons(components: list[str], seed: int) -> list[str]:
    """As many MLP neurons of the same block as ``components``, drawn at random (seeded)."""
    site = components[0].partition("[")[0]
    width = json.loads((Path(TINY_REASONER_PATH) / "config.json").read_text())["intermediate_size"]
    return [f"{site}[{index}]" for index in random.Random(seed).sample(range(width), len(components))]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95 % interval of the mean."""
    mean = statistics.fmean(values)
    return mean, (1.96 * statistics.stdev(values) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def print_tables(summary: dict[str, Any]) -> None:
    """The Markdown tables recorded in ``benchmarks/RESULTS.md``."""
    settings, base = summary["settings"], summary["base"]
    print(
        f"\nplacement on the tiny reasoner: {settings['steps']} steps x {settings['batch_size']} prompts x N=4, top-{settings['k']} neurons, "
        f"LoRA r={settings['r']}, lr {settings['lr']} (gates {settings['gate_lr']}), {settings['test']} held-out problems, "
        f"{settings['seeds']} seeds{'' if summary['complete'] else ' (PARTIAL)'}"
    )
    print("base: " + ", ".join(f"{key} {base[key]:.3f}" for key in METRICS))
    for objective in settings["objectives"]:
        print(f"\n{objective} (components: {', '.join(summary['selection'][objective])})\n")
        print("| mode | trainable parameters | " + " | ".join(METRICS) + " | seconds |")
        print("|" + " --- |" * (len(METRICS) + 3))
        for mode in settings["modes"]:
            cells = [summary["cells"][key] for seed in range(settings["seeds"]) if (key := f"{objective}|{mode}|{seed}") in summary["cells"]]
            if cells:
                values = [f"{m:.3f} +- {e:.3f}" for m, e in (interval([cell[key] for cell in cells]) for key in METRICS)]
                seconds = statistics.fmean(cell["seconds"] for cell in cells)
                print(f"| {mode} | {cells[0]['parameters']:,} | " + " | ".join(values) + f" | {seconds:.0f} |")
    print(f"\nwall time {summary['wall_time_s']} s")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="policy-gradient steps per cell (the matched budget)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--k", type=int, default=8, help="neurons selected")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA and weight-slice modes")
    parser.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the gates mode")
    parser.add_argument("--length-penalty", type=float, default=0.005, help="reward per reasoning token of right_but_shorter")
    parser.add_argument("--support", type=int, default=32, help="support problems IPG ranks the neurons on")
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--out", default="benchmarks/placement")
    parser.add_argument("--restart", action="store_true", help="replace the results in OUT instead of resuming them")
    parser.add_argument("--from-results", action="store_true", help="reprint the tables from OUT/results.json")
    args = parser.parse_args()
    args.layers = {"accuracy": 2, "right_but_shorter": 3}
    return args


def main() -> None:
    """Measure the missing cells (or reprint the tables) and print them as Markdown."""
    settings = vars(parse_args())
    out = Path(settings["out"])
    path = out / "results.json"
    if settings["from_results"]:
        if not path.is_file():
            sys.exit(f"{path} does not exist: run the benchmark with this --out first")
        print_tables(json.loads(path.read_text()))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    summary = {"settings": settings, "base": {}, "selection": {}, "cells": {}, "complete": False, "wall_time_s": 0}
    if path.exists() and not settings["restart"]:
        summary = json.loads(path.read_text())
        differ = sorted(key for key in settings.keys() - NOT_MEASUREMENT if summary["settings"].get(key) != settings[key])
        if differ:
            sys.exit(f"{path} holds a run with other settings ({', '.join(differ)}): pass --restart to replace it, or another --out")
        summary["settings"], summary["complete"] = settings, False
    out.mkdir(parents=True, exist_ok=True)
    started, earlier = time.perf_counter(), summary["wall_time_s"]
    if not summary["base"]:
        model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
        test = data(settings)
        test.connect(tokenizer)
        summary["base"] = evaluate(model, tokenizer, list(test.test_dataloader()), None, settings)
    for objective in settings["objectives"]:
        if objective not in summary["selection"]:
            summary["selection"][objective] = select(settings, objective)
    for seed in range(settings["seeds"]):
        for objective in settings["objectives"]:
            for mode in settings["modes"]:
                key = f"{objective}|{mode}|{seed}"
                if key not in summary["cells"]:
                    summary["cells"][key] = train(settings, objective, mode, seed, summary["selection"][objective])
                    summary["wall_time_s"] = round(earlier + time.perf_counter() - started)
                    atomic_write_json(path, summary)
                    cell = summary["cells"][key]
                    print(f"{key:<36} " + " ".join(f"{m} {cell[m]:.3f}" for m in METRICS) + f"  ({cell['seconds']} s)", flush=True)
    summary["complete"] = True
    summary["wall_time_s"] = round(earlier + time.perf_counter() - started)
    atomic_write_json(path, summary)
    print_tables(summary)


if __name__ == "__main__":
    main()
