"""Which reasoning-gym tasks does SmolLM2-135M-Instruct solve sometimes but not always?

The localisation benchmark's third testbed needs tasks where the model's greedy accuracy lies between
30 % and 70 %: below that, suppression has nothing to remove; above it, amplification nothing to add,
and sampled groups rarely differ. This measures greedy accuracy, answer rate and reasoning length
on the first ``--num`` problems of each candidate (a task with its difficulty knobs), with the
library's default prompt (the chat template and the ``#### <answer>`` instruction), and marks the ones
in the band. Results go to ``OUT/results.json`` after each candidate (a rerun skips measured ones).

Run: ``python benchmarks/smollm2_tasks.py`` (needs ``ipg prepare-smollm2``; ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_write_json
from ipg_lightning.rollout.trajectories import SamplingConfig

#: Candidate tasks, easiest settings of each family's difficulty knobs first.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "add_sub_1digit": (
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+", "-"],
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    "add_sub_2digit": (
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 2,
            "max_digits": 2,
            "operators": ["+", "-"],
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    "add_sub_3terms": (
        "basic_arithmetic",
        {
            "min_terms": 3,
            "max_terms": 3,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+", "-"],
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    "chain_sum_2x1": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "chain_sum_3x1": ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    "chain_sum_2x2": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}),
    "products_1digit": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    "products_2x1digit": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "leg_counting_small": ("leg_counting", {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3}),
    "letter_counting_short": ("letter_counting", {"min_words": 1, "max_words": 3}),
    "simple_equations_small": (
        "simple_equations",
        {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 10, "operators": ["+", "-"], "operators_weights": [0.5, 0.5]},
    ),
    "gcd_small": ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}),
    "lcm_small": ("lcm", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 20}),
    "count_bits_small": ("count_bits", {"min_n": 1, "max_n": 255}),
}
BAND = (0.3, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--num", type=int, default=64, help="problems per candidate")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/smollm2_tasks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    path = out / "results.json"
    settings = {"model": args.model, "num": args.num, "max_new_tokens": args.max_new_tokens}
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "candidates": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{path} holds a search with other settings {results['settings']}: pass another --out")
    model, tokenizer = load_model_and_tokenizer(args.model, "float32")
    model.to(torch.device(args.device))
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=64)
    for name in args.candidates:
        if name in results["candidates"]:
            continue
        task, kwargs = CANDIDATES[name]
        data = ReasoningDataModule(source=f"reasoning_gym:{task}", task_kwargs=kwargs, num_test=args.num, num_val=0, num_train=0, batch_size=64)
        data.connect(tokenizer)
        started = time.perf_counter()
        metrics = evaluate_generations(model, tokenizer, data.test_dataloader(), greedy).metrics
        results["candidates"][name] = {"task": task, "task_kwargs": kwargs, "metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}
        atomic_write_json(path, results)
        print(f"{name:<24} accuracy {metrics['accuracy']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nSmolLM2-135M-Instruct ({args.model}), greedy, first {args.num} problems, {args.max_new_tokens} new tokens at most")
    print("| candidate | reasoning-gym task and knobs | accuracy | answer rate | mean length | in 30-70 % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, entry in results["candidates"].items():
        m = entry["metrics"]
        knobs = ", ".join(f"{k}={v}" for k, v in entry["task_kwargs"].items() if k not in ("allow_parentheses", "allow_negation"))
        inside = "yes" if BAND[0] <= m["accuracy"] <= BAND[1] else ""
        print(f"| {name} | {entry['task']}: {knobs} | {m['accuracy']:.3f} | {m['answer_rate']:.3f} | {m['reasoning_length_mean']:.1f} | {inside} |")


if __name__ == "__main__":
    main()
