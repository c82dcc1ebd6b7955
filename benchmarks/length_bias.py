"""How much of a length attribution is the fixed surrogate's length term: components that damage the model score as "lengthening".

With fixed estimation, IPG integrates the gradient of the surrogate ``S(c) = sum_r A_r log pi_c(tau_r)``
over trajectories ``tau_r`` sampled once at gates = 1 (advantages ``A_r`` within each prompt's N
samples). Removing a set of components changes it by ``sum_r A_r Delta_r``, with
``Delta_r = log pi_1(tau_r) - log pi_0(tau_r)``. Write ``Delta_r = dbar |tau_r| + e_r``, where
``dbar`` is the mean drop per token over all trajectories:

    sum_r A_r Delta_r = dbar * sum_r A_r |tau_r|  +  sum_r A_r e_r
                        (length term)               (the rest)

For the reasoning-length reward ``A_r`` grows with ``|tau_r|``, so any component whose removal lowers
the likelihood of every token alike (``dbar > 0``: it damages the model) looks like one that makes
traces longer, from the length term alone, whatever removing it does to length. Dividing each
trajectory's log-likelihood by its length (``sum_r A_r Delta_r / |tau_r|``) cancels that term, since
each prompt's advantages sum to zero.

For the top-k length components of each row of a localisation run (``results.json``), this script
samples that run's support problems of one seed again (HF engine by default), removes the
components (gate 0), and prints both terms, the length term's share, the per-token version, and
the length the run measured with them removed.

Run: ``python benchmarks/length_bias.py benchmarks/localisation_smollm2 --seed 0``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

import torch
from testbeds import TESTBEDS

from ipg_lightning.attribution.estimator import group_advantages
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rewards.completions import reward_matrix
from ipg_lightning.rewards.functions import load_reward
from ipg_lightning.rollout.engine_names import Engine
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import completion_log_probs
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories
from ipg_lightning.steering import gates_for_components


@torch.no_grad()
def trajectory_log_likelihoods(model: torch.nn.Module, trajectories: Trajectories, chunk_size: int = 16) -> torch.Tensor:
    """``log pi(tau_r)`` of every trajectory (the sum over its generated tokens), in float64."""
    values = torch.zeros(len(trajectories), dtype=torch.float64)
    for rows, chunk in trajectories.chunks(chunk_size):
        values[rows.start : rows.stop] = completion_log_probs(model, chunk).double().sum(-1).cpu()
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a localisation run's output directory (its results.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=["ipg", "grad_x_act", "mean_diff", "activation", "random"])
    parser.add_argument("--engine", default="hf", choices=get_args(Engine), help="what samples the support problems again")
    args = parser.parse_args()
    summary = json.loads((args.results / "results.json").read_text())
    settings = summary["settings"]
    cells = {row: summary["cells"].get(f"length|{row}|{args.seed}", {}) for row in args.rows}
    cells = {row: cell for row, cell in cells.items() if "components" in cell}
    if not cells:
        sys.exit(f"{args.results} has no measured length cells of seed {args.seed} for {args.rows}")
    testbed = TESTBEDS[settings["testbed"]]
    model, tokenizer = load_model_and_tokenizer(testbed.model, settings.get("dtype", "float32"))
    support, count = testbed.tasks[settings["support_task"]], settings["support"]
    data = support.data(num_test=settings["test"], num_val=count * (args.seed + 1), batch_size=16)
    data.setup()
    data.examples["val"] = data.examples["val"][count * args.seed :]  # the run's support problems of this seed
    data.connect(tokenizer)
    batch = data.full_batch("val")
    sampling = SamplingConfig(
        num_samples=settings["num_samples"],
        temperature=0.7,
        top_p=1.0,
        max_new_tokens=testbed.max_new_tokens,
        batch_size=64,
        seed=args.seed,
        engine=args.engine,
    )
    trajectories = sample_trajectories(model, tokenizer, batch["prompt"], sampling, progress=True)
    rewards = reward_matrix(load_reward("reasoning_length"), trajectories, batch["prompt"], batch["answer"], tokenizer)
    advantages = group_advantages(rewards)[0].flatten()
    lengths = torch.tensor([len(ids) for ids in trajectories.completion_ids], dtype=torch.float64)
    base = trajectory_log_likelihoods(model, trajectories)
    prompts = len(batch["prompt"])
    print(
        f"\n{testbed.description}, seed {args.seed}: {len(trajectories)} trajectories of {prompts} support problems "
        f"(mean length {float(lengths.mean()):.1f}, {args.engine} engine); components removed at gate 0\n"
    )
    print("| row | dbar (nats/token) | sum A Delta / M | length term / M | share | per-token sum A Delta/len / M | length at gate 0 (run) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row, cell in cells.items():
        gates = gates_for_components(model, cell["components"], 0.0)
        with gates.attach(model):
            removed = trajectory_log_likelihoods(model, trajectories)
        delta = base - removed
        dbar = float(delta.sum() / lengths.sum())
        total = float((advantages * delta).sum()) / prompts
        length_term = dbar * float((advantages * lengths).sum()) / prompts
        per_token = float((advantages * delta / lengths.clamp(min=1)).sum()) / prompts
        measured = cell["gammas"]["0.0"]["reasoning_length_mean"]
        share = length_term / total if total else float("nan")
        print(f"| {row} | {dbar:.4f} | {total:.3f} | {length_term:.3f} | {share:.2f} | {per_token:.4f} | {measured:.1f} |")
    base_length = summary["base"]["sampled"]["reasoning_length_mean"]
    print(f"\nThe run's sampled base length: {base_length:.1f} tokens.")


if __name__ == "__main__":
    main()
