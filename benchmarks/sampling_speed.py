"""Sampling speed: ``sample_trajectories`` against plain ``model.generate(do_sample=True)``, at fixed length.

In one process, conditions interleaved, medians of several repeats: plain Hugging Face sampling
(temperature, top-p) of a left-padded batch; ``sample_trajectories`` of the same prompts with the
same settings (one completion each, its reproducible per-completion draws); the same over a static
KV cache (``kv_cache: static``); and the same with gates attached on one block's MLP neurons, at 1
and at 0.5. EOS is masked out (a hook on the output
head, the same in every condition), so every condition generates exactly ``--new-tokens`` per row.

    python benchmarks/sampling_speed.py                                   # the shipped tiny reasoner
    python benchmarks/sampling_speed.py --model smollm2 --batch 16         # SmolLM2-135M-Instruct
    python benchmarks/sampling_speed.py --batch 256 --new-tokens 160       # the demo's evaluation calls
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig, pad_rows
from ipg_lightning.zoo.reasoner import TINY_REASONER_PATH

PROMPT = "Q: Start with {a}. Add {b}, then add {c}. What is the result?\nA:"


def main() -> None:
    """Time plain generate and sample_trajectories (plain and gated); print tokens/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_REASONER_PATH)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(args.device)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(-1, torch.tensor(eos, device=logits.device), float("-inf"))
    )
    prompts = [PROMPT.format(a=i % 10, b=(3 * i) % 10, c=(7 * i) % 10) + " " * (i % 3) for i in range(args.batch)]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    padded = pad_rows(encoded, [[] for _ in encoded], tokenizer.pad_token_id)
    inputs = {"input_ids": padded["input_ids"].to(args.device), "attention_mask": padded["attention_mask"].to(args.device)}
    config = SamplingConfig(num_samples=1, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens, batch_size=args.batch)
    static = replace(config, kv_cache="static")
    layer = model.config.num_hidden_layers // 2
    gates_one = ComponentGates.for_model(model, ["mlp_neuron"], [layer]).to(args.device)
    gates_half = ComponentGates.for_model(model, ["mlp_neuron"], [layer], init=0.5).to(args.device)

    def plain() -> int:
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            max_new_tokens=args.new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    def ours(gates: ComponentGates | None = None, settings: SamplingConfig = config) -> int:
        if gates is None:
            return sample_trajectories(model, tokenizer, prompts, settings).num_completion_tokens
        with gates.attach(model):
            return sample_trajectories(model, tokenizer, prompts, settings).num_completion_tokens

    conditions = {
        "plain generate": plain,
        "ours": ours,
        "ours, static cache": lambda: ours(settings=static),
        "ours, gates at 1": lambda: ours(gates_one),
        "ours, gates at 0.5": lambda: ours(gates_half),
    }
    rates: dict[str, list[float]] = {name: [] for name in conditions}
    with torch.no_grad():
        plain()  # warm-up
        for _ in range(args.repeats):
            for name, run in conditions.items():
                start = time.perf_counter()
                tokens = run()
                rates[name].append(tokens / (time.perf_counter() - start))
    base = statistics.median(rates["plain generate"])
    settings = f"batch {args.batch} x {args.new_tokens} new tokens, temperature {args.temperature}, top-p {args.top_p}"
    print(f"{args.model}: {settings}, medians of {args.repeats}")
    for name, values in rates.items():
        print(f"{name:<22}{statistics.median(values):10.0f} tokens/s   {statistics.median(values) / base:.3f}x plain generate")


if __name__ == "__main__":
    main()
