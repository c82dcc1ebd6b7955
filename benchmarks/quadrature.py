"""How many quadrature points does IPG need? Completeness on the shipped tiny reasoner, per rule.

IPG's scores sum to the surrogate's change along the path, ``L(1) - L(baseline)``, only as far as
the quadrature is exact. This prints, for the accuracy and the reasoning-length rewards over the
MLP neurons of one block, the sum of scores, ``L(1) - L(0)``, the relative residual and the time
for several rules and numbers of points, with the same trajectories in every row (same seed).

Run: ``python benchmarks/quadrature.py`` (about 4 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK

SETTINGS = (("right", 10), ("right", 40), ("midpoint", 10), ("gauss_legendre", 5), ("gauss_legendre", 10), ("gauss_legendre", 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY_REASONER_PATH)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--support", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model, tokenizer = load_model_and_tokenizer(args.model)
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=64, num_val=args.support, num_train=0, batch_size=8)
    data.connect(tokenizer)
    print(f"block {args.layer} MLP neurons, {args.support} support problems x N=4 at temperature 0.7, zero baseline")
    print("| reward | rule | q | sum of scores | L(1) - L(0) | relative residual | top-4 neurons | time s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for reward in ("accuracy", "reasoning_length"):
        for rule, steps in SETTINGS:
            start = time.perf_counter()
            module = IPGAttribution.for_model(
                model,
                tokenizer,
                reward=reward,
                families=["mlp_neuron"],
                layers=[args.layer],
                steps=steps,
                rule=rule,
                surrogate="sum",  # the surrogate its recorded table used (the library's default before 2026-12-07)
                sampling=SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64, seed=0),
                chunk_size=32,
            )
            report = run_attribution(module, data, enable_progress_bar=False)
            block = report.metadata.completeness
            top = [name.split("[")[1].rstrip("]") for name in report.select(k=4)]
            print(
                f"| {reward} | {rule} | {steps} | {block.sum_of_scores:.4g} | {block.surrogate_delta:.4g} | "
                f"{block.relative_residual:.2g} | {' '.join(top)} | {time.perf_counter() - start:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
