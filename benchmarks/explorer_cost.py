"""What does an explorer page cost, relative to the attribution it explores?

On the shipped reasoner, with the demo's settings (32 support problems x N = 4, temperature 0.7,
Gauss-Legendre), one process times, per report:

- the attribution (``run_attribution`` with ``keep_trajectories``: sampling, then q teacher-forced
  forward/backward passes per site);
- the explorer page for it (``page_for_report``: one activation pass over the kept trajectories,
  another over the shown ones, and q forward/backward passes per traced site for the per-token
  contributions; then the page), at the defaults (50 components, 8 trajectories each);

and prints the ratio page / attribution and the page's size. Reports: block 3's MLP neurons at
q = 16 (accuracy and reasoning length) and the shipped SAE's 1,024 features at q = 32 (reasoning
length), as in ``ipg demo``.

Run: ``python benchmarks/explorer_cost.py [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.explorer import page_for_report
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH, TINY_REASONER_TASK

#: (label, reward, attribution settings) of each measured report.
REPORTS = [
    ("neurons, accuracy", "accuracy", {"families": ["mlp_neuron"], "layers": [3], "steps": 16}),
    ("neurons, length", "reasoning_length", {"families": ["mlp_neuron"], "layers": [3], "steps": 16}),
    ("SAE features, length", "reasoning_length", {"families": ["sae_feature"], "layers": [2], "steps": 32, "saes": [TINY_REASONER_SAE_PATH]}),
]


def main() -> None:
    """Time attribution and explorer page for each report, best of ``--repeats``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--support", type=int, default=32)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    lm, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_val=args.support, num_train=args.support, num_test=8, batch_size=8)
    data.connect(tokenizer)
    sampling = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64)
    print(f"{'report':<24}{'attribution s':>15}{'page s':>10}{'page / attribution':>20}{'page MB':>10}")
    with tempfile.TemporaryDirectory() as scratch:
        for number, (label, reward, settings) in enumerate(REPORTS):
            attribution_s, page_s, size = [], [], 0
            for repeat in range(args.repeats):
                module = IPGAttribution.for_model(
                    *(lm, tokenizer),
                    reward=reward,
                    rule="gauss_legendre",
                    surrogate="sum",  # the surrogate its recorded table used (the library's default before 2026-12-07)
                    sampling=sampling,
                    chunk_size=32,
                    keep_trajectories=True,
                    **settings,
                )
                started = time.perf_counter()
                report = run_attribution(module, data, enable_progress_bar=False)
                attribution_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                page = page_for_report(report, lm, tokenizer, Path(scratch) / f"{number}_{repeat}.html")
                page_s.append(time.perf_counter() - started)
                size = page.stat().st_size
            best_attribution, best_page = min(attribution_s), min(page_s)
            print(f"{label:<24}{best_attribution:>15.1f}{best_page:>10.1f}{best_page / best_attribution:>20.2f}{size / 1e6:>10.2f}")


if __name__ == "__main__":
    main()
