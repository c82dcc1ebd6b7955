"""Sampling engines: tokens/s of ``engine: vllm`` against ``engine: hf`` on a reasoning workload, gated and ungated.

One process, the library's own ``sample_trajectories`` in every condition, natural lengths (EOS
ends a completion): arithmetic word problems (reasoning-gym ``basic_arithmetic``, chat template),
``--samples`` completions each at temperature 0.7, top-p 0.9, at most ``--max-new-tokens``.

- ``hf``: the HF engine (``batch_size`` 16) on the first ``--hf-problems`` problems (it works in
  fixed batches, so its tokens/s does not depend on how many there are);
- ``vllm``: every problem; its start-up is timed apart, and a short warm-up call runs first;
- ``vllm, gates on one block's MLP neurons`` and ``vllm, gates on every block's residual stream``:
  the same call with gates at 1 (the same tokens, so the ratio is the gates' cost per token);
- greedy agreement: the first ``--greedy-problems`` problems decoded greedily by both engines.

    python benchmarks/engine_speed.py --model ~/.cache/ipg_lightning/SmolLM2-135M-Instruct
    python benchmarks/engine_speed.py --problems 16 --hf-problems 8 --max-new-tokens 64   # a quick look
    python benchmarks/engine_speed.py --model ... --hf-only   # the HF engine alone, in an environment without vLLM
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout import vllm_engine
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig, Trajectories


def main() -> None:
    """Time each engine's sampling and print tokens/s, ratios and greedy agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face directory")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--hf-problems", type=int, default=16)
    parser.add_argument("--greedy-problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--hf-only", action="store_true", help="time the HF engine alone (no vLLM in the process)")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    data = ReasoningDataModule(
        source="reasoning_gym:basic_arithmetic",
        task_kwargs={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
        num_train=0,
        num_val=0,
        num_test=args.problems,
    )
    data.connect(tokenizer)
    batch = data.full_batch("test")
    prompts, seeds = batch["prompt"], batch["seed"].tolist()
    hf = SamplingConfig(num_samples=args.samples, temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, batch_size=16)
    vllm = replace(hf, engine="vllm")

    def timed(label: str, config: SamplingConfig, count: int, gates: ComponentGates | None = None) -> Trajectories:
        started = time.perf_counter()
        if gates is None:
            trajectories = sample_trajectories(model, tokenizer, prompts[:count], config, seeds[:count])
        else:
            with gates.attach(model):
                trajectories = sample_trajectories(model, tokenizer, prompts[:count], config, seeds[:count])
        seconds = time.perf_counter() - started
        tokens = trajectories.num_completion_tokens
        rates[label] = tokens / seconds
        print(f"{label:<52} {len(trajectories):>4} completions {tokens:>7} tokens {seconds:>7.1f} s {rates[label]:>7.1f} tokens/s", flush=True)
        return trajectories

    rates: dict[str, float] = {}
    if args.hf_only:
        timed("hf", hf, args.hf_problems)
        return
    started = time.perf_counter()
    vllm_engine.engine_for(model, vllm.vllm)
    print(f"vLLM engine start-up: {time.perf_counter() - started:.1f} s", flush=True)
    sample_trajectories(model, tokenizer, prompts[:2], replace(vllm, num_samples=1, max_new_tokens=8), seeds[:2])  # warm-up
    timed("hf", hf, args.hf_problems)
    plain = timed("vllm", vllm, args.problems)
    layer = model.config.num_hidden_layers // 2
    neurons = ComponentGates.for_model(model, ["mlp_neuron"], [layer])
    residual = ComponentGates.for_model(model, ["resid_post"])
    gated = {
        label: timed(label, vllm, args.problems, gates)
        for label, gates in ((f"vllm, gates on block {layer}'s MLP neurons", neurons), ("vllm, gates on every block's residual stream", residual))
    }
    print(f"\nvllm / hf: {rates['vllm'] / rates['hf']:.2f}x")
    for label, trajectories in gated.items():
        same = trajectories.completion_ids == plain.completion_ids
        print(f"{label}: {rates['vllm'] / rates[label] - 1:+.1%} time per token against ungated vllm (same tokens: {same})")
    greedy = SamplingConfig.greedy(args.max_new_tokens, batch_size=16)
    count = args.greedy_problems
    on_hf = sample_trajectories(model, tokenizer, prompts[:count], greedy, seeds[:count])
    on_vllm = sample_trajectories(model, tokenizer, prompts[:count], replace(greedy, engine="vllm"), seeds[:count])
    agree = sum(a == b for a, b in zip(on_hf.completion_ids, on_vllm.completion_ids, strict=True))
    print(f"greedy completions identical on both engines: {agree} of {count}")


if __name__ == "__main__":
    main()
