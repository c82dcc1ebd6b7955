"""Peak memory of IPG's teacher-forced passes on long traces, against one plain forward/backward.

Every measurement runs in its own fresh process (so nothing one left resident flatters the next;
on the CPU with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the resident set),
on the same synthetic trajectories: ``--rows`` completions of ``--tokens`` random tokens each after
a 32-token prompt. Peak memory is measured above what the process holds once the model and the
trajectories are loaded (:class:`ipg_lightning.rollout.passes.memory.PeakMemory`: allocated tensors on CUDA, the
resident set on the CPU). The conditions:

- ``train``: one plain forward/backward of the same surrogate with the weights trainable (what
  fine-tuning on this chunk costs, before any optimiser state): the reference of the ratios;
- ``forward``: one teacher-forced forward without gradients;
- ``ipg``: the q passes of one IPG step on an MLP-neuron site (``integrate_fixed``, all rows in
  one chunk, frozen prefix replayed), as the library runs them by default;
- ``ipg+log_softmax``: the same with the old head (``log_softmax(logits.float()).gather``) put back;
- ``ipg+checkpoint``: with ``memory.checkpoint_blocks`` (the blocks from the site up recomputed);
- ``ipg+row``: with ``memory.chunk_tokens`` at one row's tokens (one row per forward/backward);
- ``ipg+budget``: with ``memory.budget_gb`` at ``--budget-gb`` (chunks sized from the first row).

    python benchmarks/attribution_memory.py                               # SmolLM2-135M, CPU, float32
    python benchmarks/attribution_memory.py --device cuda --dtype bfloat16 --model /path/to/Qwen2.5-1.5B
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from ipg_lightning.attribution.paths import integrate_fixed
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import DTYPES, load_model_and_tokenizer
from ipg_lightning.rollout.passes.memory import PeakMemory
from ipg_lightning.rollout.passes.teacher_forced import MemoryLimits, TeacherForcedPasses
from ipg_lightning.rollout.scoring import completion_log_probs, frozen_parameters
from ipg_lightning.rollout.trajectories import Trajectories

CONDITIONS = ["train", "forward", "ipg", "ipg+log_softmax", "ipg+checkpoint", "ipg+row", "ipg+budget"]
PROMPT_TOKENS = 32


def synthetic_trajectories(vocabulary: int, rows: int, tokens: int) -> Trajectories:
    """``rows`` random completions of ``tokens`` tokens after random 32-token prompts (seeded)."""
    generator = torch.Generator().manual_seed(0)
    draw = lambda length: torch.randint(5, vocabulary, (length,), generator=generator).tolist()  # noqa: E731
    return Trajectories(
        prompt_ids=[draw(PROMPT_TOKENS) for _ in range(rows)],
        completion_ids=[draw(tokens) for _ in range(rows)],
        completions=[""] * rows,
        prompt_index=list(range(rows)),
        sample_index=[0] * rows,
        pad_token_id=0,
    )


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One condition in this process: its peak memory above the loaded state (GiB) and the model's size."""
    model, _ = load_model_and_tokenizer(args.model, args.dtype)
    model.to(args.device)
    trajectories = synthetic_trajectories(model.config.vocab_size, args.rows, args.tokens)
    trajectories.padded()
    weights = torch.linspace(-1.0, 1.0, args.rows)
    layer = args.layer if args.layer is not None else round(0.75 * (model.config.num_hidden_layers - 1))
    gates = ComponentGates.for_model(model, ["mlp_neuron"], [layer]).to(args.device)
    if args.condition == "ipg+log_softmax":
        import ipg_lightning.rollout.trajectories as scoring

        scoring.target_log_probs = lambda logits, targets: torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    limits = {
        "ipg+checkpoint": MemoryLimits(checkpoint_blocks=True),
        "ipg+row": MemoryLimits(chunk_tokens=PROMPT_TOKENS + args.tokens),
        "ipg+budget": MemoryLimits(budget_gb=args.budget_gb),
    }.get(args.condition, MemoryLimits())
    with PeakMemory(args.device) as meter:
        if args.condition == "train":
            (weights.to(args.device) * completion_log_probs(model, trajectories).sum(-1)).sum().backward()
        elif args.condition == "forward":
            with torch.no_grad(), frozen_parameters(model):
                completion_log_probs(model, trajectories)
        else:
            passes = TeacherForcedPasses(model, args.rows, layer, limits, reuse_prefix=True)
            with gates.attach(model):
                integrate_fixed(model, gates, trajectories, weights, "layer", 0.0, ("right", args.steps), passes)
    return {"peak_gib": meter.peak_above_start_bytes / 2**30, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    """Run every condition at every length in fresh processes; print peaks and ratios to ``train``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--layer", type=int, default=None, help="the attributed block (default: 3/4 depth)")
    parser.add_argument("--steps", type=int, default=2, help="quadrature points (the peak does not grow with them)")
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--conditions", nargs="+", default=CONDITIONS, choices=CONDITIONS)
    parser.add_argument("--condition", help=argparse.SUPPRESS)  # set in the worker processes
    args = parser.parse_args()
    if args.condition is not None:
        args.tokens = args.tokens[0]
        print(json.dumps(measure(args)))
        return
    torch.set_num_threads(torch.get_num_threads())
    setting = f"{args.rows} rows x (32-token prompt + completion), MLP neurons at 3/4 depth, q={args.steps}"
    print(f"model {args.model} ({args.dtype}, {args.device}), {setting}")
    header = f"{'tokens':>7}" + "".join(f"{c:>17}" for c in args.conditions)
    print("peak GiB above the loaded model (ratio to train)\n" + header + "\n" + "-" * len(header))
    for tokens in args.tokens:
        cells = {}
        for condition in args.conditions:
            worker = [sys.executable, __file__, "--condition", condition, "--tokens", str(tokens), "--model", args.model, "--dtype", args.dtype]
            worker += ["--device", args.device, "--rows", str(args.rows), "--steps", str(args.steps), "--budget-gb", str(args.budget_gb)]
            worker += ["--layer", str(args.layer)] if args.layer is not None else []
            environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            result = subprocess.run(worker, capture_output=True, text=True, check=True, env=environment)
            cells[condition] = json.loads(result.stdout.strip().splitlines()[-1])["peak_gib"]
        reference = cells.get("train")
        print(f"{tokens:>7}" + "".join(f"{cells[c]:>10.2f}" + (f" ({cells[c] / reference:.2f})" if reference else " " * 7) for c in args.conditions))


if __name__ == "__main__":
    main()
