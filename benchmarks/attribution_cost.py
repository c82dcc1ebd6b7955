"""What does IPG attribution cost, relative to the work it cannot avoid?

Measured in one process, on one model and the same tokens:

1. ``IPG / (sampling + q x plain forward/backward)``: one attribution step through the real loop
   (``Trainer.validate``) against its unavoidable parts timed bare. The plain forward/backward
   backpropagates the same surrogate, with weights frozen and no gates, down to the very tensor
   the site's gates scale (made a leaf by a hook), so both backward passes stop at the same place
   and the ratio isolates the cost of the gates and the loop's bookkeeping. Target: close to 1.
2. IPG time per site family (4 heads ... 4 x d_model neurons): should not grow with the number
   of components.
3. Per-component ablation of the same family (one teacher-forced forward per component with its
   gate at 0), the brute-force alternative, timed on a subset and scaled linearly.

Run: ``python benchmarks/attribution_cost.py [--hidden 256 --layers 4 --new-tokens 64]``; on a GPU
add ``--device cuda --dtype bfloat16`` (the Trainer then runs on that device).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.gates.component_gates import ComponentGates
from ipg_lightning.model.loading import DTYPES
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import completion_log_probs, frozen_parameters, weighted_log_likelihood
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.zoo.tiny import tiny_tokenizer


def digit_fraction(completion) -> float:
    """A reward with spread on a random model: the share of digits in the completion."""
    return sum(ch.isdigit() for ch in completion.text) / max(len(completion.text), 1)


def build_model(hidden: int, layers: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        embeddings = model.get_input_embeddings()
        embeddings.weight[0] = embeddings.weight[-1]  # no all-zero pad row (see ipg_lightning.zoo.tiny)
    return model


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ablation-subset", type=int, default=32)
    parser.add_argument("--layer", type=int, default=0, help="the attributed block (the paper: 3/4 depth)")
    parser.add_argument("--families", nargs="+", default=["attn_head", "attn_out", "resid_post", "mlp_neuron"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(torch.get_num_threads())

    device = torch.device(args.device)
    model, tokenizer = build_model(args.hidden, args.layers, dtype=DTYPES[args.dtype]).to(device), tiny_tokenizer()
    data = ReasoningDataModule(
        num_train=0, num_val=args.prompts, num_test=0, batch_size=args.prompts, template=PromptTemplate(use_chat_template=False)
    )
    data.connect(tokenizer)
    batch = next(iter(data.val_dataloader()))
    sampling = SamplingConfig(
        num_samples=args.samples, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, batch_size=args.prompts * args.samples
    )
    settings = dict(
        reward=digit_fraction,
        sampling=sampling,
        chunk_size=args.prompts * args.samples,
        steps=args.steps,
        layers=[args.layer],
    )

    # The unavoidable parts, timed bare.
    trajectories = sample_trajectories(model, tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
    weights = torch.randn(len(trajectories), device=device)
    sampling_time = median_time(lambda: sample_trajectories(model, tokenizer, batch["prompt"], sampling, batch["seed"].tolist()), args.repeats)

    def plain_forward_backward(site) -> None:
        """The same surrogate's forward and backward, stopping at the site's tensor (no gates)."""
        module = model.get_submodule(site.module_path)
        if site.hooks_input:
            handle = module.register_forward_pre_hook(lambda m, a: (a[0].detach().requires_grad_(True), *a[1:]))
        else:
            handle = module.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
        try:
            with frozen_parameters(model):
                (weights * completion_log_probs(model, trajectories).sum(-1)).sum().backward()
        finally:
            handle.remove()

    forward_time = median_time(lambda: weighted_log_likelihood(model, trajectories, weights, len(trajectories)), args.repeats)
    tokens = trajectories.num_completion_tokens
    print(
        f"model: llama, d_model={args.hidden}, {args.layers} layers, {args.dtype} on {device}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; torch threads {torch.get_num_threads()}"
    )
    print(f"work: {args.prompts} prompts x N={args.samples} samples, {tokens} completion tokens, q={args.steps}, sites at layer {args.layer}")
    print(f"sampling {sampling_time:.3f} s | teacher-forced forward {forward_time:.3f} s\n")

    header = (
        f"{'site family':<14}{'components':>11}{'plain f+b s':>12}{'unavoid. s':>12}{'IPG step s':>12}"
        f"{'IPG/unavoid.':>14}{'uncached s':>12}{'uncached/unav.':>16}{'ablation s':>12}{'ablation/IPG':>14}"
    )
    print(header)
    print("-" * len(header))
    for family in args.families:
        gates = ComponentGates.for_model(model, [family], layers=[args.layer]).to(device)
        site = next(iter(gates.sites.values()))
        forward_backward_time = median_time(lambda: plain_forward_backward(site), args.repeats)
        unavoidable = sampling_time + args.steps * forward_backward_time

        def ipg_step(reuse_prefix: bool = True) -> IPGAttribution:
            module = IPGAttribution.for_model(model, tokenizer, families=[family], reuse_prefix=reuse_prefix, **settings)
            run_attribution(module, data, device, enable_progress_bar=False)
            return module

        ipg_time = median_time(ipg_step, args.repeats)
        uncached_time = median_time(lambda: ipg_step(reuse_prefix=False), args.repeats)
        subset = min(site.size, args.ablation_subset)

        def ablate_subset() -> None:
            with gates.attach(model):
                for index in range(subset):
                    gates.set_site(site.name, 1.0)
                    gates.set_component(site.component_name(index), 0.0)
                    weighted_log_likelihood(model, trajectories, weights, len(trajectories))

        ablation_time = median_time(ablate_subset, 1) * site.size / subset
        print(
            f"{family:<14}{site.size:>11}{forward_backward_time:>12.3f}{unavoidable:>12.3f}{ipg_time:>12.3f}"
            f"{ipg_time / unavoidable:>14.3f}{uncached_time:>12.3f}{uncached_time / unavoidable:>16.3f}"
            f"{ablation_time:>12.3f}{ablation_time / ipg_time:>14.2f}"
        )
    print(
        "\nablation: one teacher-forced forward per component over the same trajectories "
        f"(timed on {args.ablation_subset} components, scaled linearly); it gives one number per component "
        "for one gate setting, with no sampling and no integration."
    )


if __name__ == "__main__":
    main()
