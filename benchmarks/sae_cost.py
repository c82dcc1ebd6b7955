"""What does an SAE spliced into the model cost: in sampling, and in one IPG step over its features?

On the shipped reasoner with its shipped SAE (1,024 features on block 2's residual output), in one
process and interleaved, medians of several repeats:

- sampling (the demo's support problems, N = 4, temperature 0.7, 160 new tokens) with no gates, with
  gates at 1 on block 2's 384 MLP neurons, and with gates at 1 on the SAE's features (the splice
  encodes every token and decodes the change, which is zero while the gates are 1);
- one IPG step (sampling plus q teacher-forced forward/backward passes) over the neurons and over
  the features, at the same q.

    python benchmarks/sae_cost.py --repeats 3
    python benchmarks/sae_cost.py --device cuda          # on a GPU (the SAE stays float32)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import attach_sae
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH, TINY_REASONER_TASK


def main() -> None:
    """Time sampling and IPG steps with and without the SAE; print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model, tokenizer = load_model_and_tokenizer(TINY_REASONER_PATH)
    model.to(device)
    attach_sae(model, TINY_REASONER_SAE_PATH)
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_train=0, num_val=args.prompts, num_test=0, batch_size=args.prompts)
    data.connect(tokenizer)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    sampling = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64)
    conditions = {
        "plain": None,
        "neuron gates": ComponentGates.for_model(model, ["mlp_neuron"], [2]).to(device),
        "SAE feature gates": ComponentGates.for_model(model, ["sae_feature"], [2]).to(device),
    }
    times: dict[str, list[float]] = {name: [] for name in [*conditions, "IPG step, neurons", "IPG step, SAE features"]}
    for _ in range(args.repeats):
        for name, gates in conditions.items():
            start = time.perf_counter()
            if gates is None:
                sample_trajectories(model, tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
            else:
                with gates.attach(model):
                    sample_trajectories(model, tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
            times[name].append(time.perf_counter() - start)
        for name, family in (("IPG step, neurons", "mlp_neuron"), ("IPG step, SAE features", "sae_feature")):
            module = IPGAttribution.for_model(
                model, tokenizer, families=[family], layers=[2], steps=args.steps, rule="gauss_legendre", sampling=sampling, chunk_size=32
            )
            start = time.perf_counter()
            run_attribution(module, data, enable_progress_bar=False, device=device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.prompts} prompts x 4 samples, 160 new tokens; IPG q = {args.steps}; medians of {args.repeats}")
    for name, value in median.items():
        base = median["plain"] if not name.startswith("IPG") else median["IPG step, neurons"]
        print(f"{name:<24}{value:8.2f} s   {value / base:5.2f}x {'plain sampling' if not name.startswith('IPG') else 'the neuron step'}")


if __name__ == "__main__":
    main()
