"""Which selection method localises reasoning best? IPG against the baselines, on the tiny reasoner.

For each method (ipg, grad_x_act, ig_reference, mean_diff, activation, random) and seed:
attribute accuracy on the support problems (validation split), take the top-p MLP neurons of one
block, and measure held-out accuracy (test split, greedy) with them suppressed (gate 0) and
amplified (gate 1.5), for several p. A better method moves accuracy more with fewer components.
Seeds change the support problems and the sampling; intervals are mean +- 1.96 standard errors.

With ``--ipg-variants``, rows ``ipg [variant]`` for IPG's estimator settings (``local`` credit,
``retries``: redraw zero-signal groups, ``grpo`` advantages, ``resample`` estimation, N = 8 or 16);
the table reports each row's attribution wall time per seed.

With ``--sae-methods``, the same for the features of an SAE at a site of the same block (the shipped
SAE reads block 2's residual output), as rows marked ``[SAE]``: p of its 1024 features against p of
the block's 384 MLP neurons.

Then the length-control curve (``--skip-length`` leaves it out): the top-k IPG components of the reasoning-length reward (last
block) scaled by gamma, against k random neurons of the same block, with mean reasoning length and
accuracy per gamma. Length is measured on sampled completions (temperature 0.7, 4 per problem, the
same seeds in every condition): greedy decoding almost never takes the "Wait, let me check" branch.

Run: ``python benchmarks/localisation.py`` (about 10 min on 2 CPU cores; ``--help`` for knobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.attribution.plots import plt
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.models import DTYPES, load_model_and_tokenizer
from ipg_lightning.outputs import atomic_write_json
from ipg_lightning.reasoner import TINY_REASONER_PATH, TINY_REASONER_SAE_PATH, TINY_REASONER_TASK
from ipg_lightning.steering import gates_for_components
from ipg_lightning.trajectories import SamplingConfig

METHODS = ("ipg", "grad_x_act", "ig_reference", "mean_diff", "activation", "random")
#: Estimator variants of IPG, as overrides of its settings (``--ipg-variants``); ``grad_x_act`` is q = 1.
VARIANTS = {
    "local": {"credit": "local"},
    "retries": {"signal_retries": 4},
    "grpo": {"advantage": "grpo"},
    "resample": {"estimation": "resample"},
    "n8": {"num_samples": 8},
    "n16": {"num_samples": 16},
}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95 % interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def write_figure(summary: dict, out: Path) -> None:
    """Suppression and enhancement curves per method, and the length-control curve (atomically)."""
    args = argparse.Namespace(**summary["settings"])
    base, results, length_curve = summary["base"], summary["results"], summary["length_curve"]
    figure, axes = plt.subplots(1, 3 if length_curve else 2, figsize=(14 if length_curve else 9.5, 3.8))
    for axis, condition in zip(axes[:2], ("suppress", "amplify"), strict=True):
        for method in results:
            means, errors = zip(*(interval(results[method][condition][p]) for p in args.ps), strict=True)
            axis.errorbar(args.ps, means, yerr=errors, marker="o", capsize=3, label=method)
        axis.axhline(base["accuracy"], color="grey", linestyle="--", label="base")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("p (top components)")
        axis.set_ylabel("held-out accuracy")
        axis.set_title(f"{condition} (gate {'0' if condition == 'suppress' else '1.5'})")
    axes[0].legend(fontsize=7)
    if length_curve:
        _length_panel(axes[2], length_curve, args)
    figure.tight_layout()
    figure.savefig(out / "localisation.png.tmp", dpi=110, format="png")
    (out / "localisation.png.tmp").replace(out / "localisation.png")


def _length_panel(axis, length_curve: list[dict], args: argparse.Namespace) -> None:
    """Mean reasoning length and accuracy against gamma, IPG against random components."""
    gammas = [r["gamma"] for r in length_curve]
    twin = axis.twinx()
    for name, style in (("ipg", "-"), ("random", ":")):
        axis.plot(gammas, [r[name]["reasoning_length_mean"] for r in length_curve], "o" + style, color="tab:blue", label=f"{name} length")
        twin.plot(gammas, [r[name]["accuracy"] for r in length_curve], "s" + style, color="tab:red", label=f"{name} accuracy")
    axis.set_xlabel(f"gamma on {args.length_k} block-{args.length_layer} neurons")
    axis.set_ylabel("mean reasoning length (tokens)")
    twin.set_ylabel("accuracy", color="tab:red")
    twin.set_ylim(0, 1)
    axis.legend(fontsize=7, loc="upper left")
    twin.legend(fontsize=7, loc="lower right")
    axis.set_title("length control")


def print_tables(summary: dict) -> None:
    """The Markdown tables recorded in ``benchmarks/RESULTS.md``."""
    args = argparse.Namespace(**summary["settings"])
    base, results, length_curve = summary["base"], summary["results"], summary["length_curve"]
    print(
        f"\nbase accuracy {base['accuracy']:.3f}, mean length {base['reasoning_length_mean']:.1f} "
        f"({args.test} held-out problems, {args.seeds} seeds, block {args.layer} MLP neurons"
        f"{' and SAE features' if getattr(args, 'sae_methods', None) else ''}, "
        f"N={getattr(args, 'num_samples', 4)} per support problem)"
    )
    seconds = summary.get("attribution_seconds", {})
    header = "| method | " + " | ".join(f"suppress p={p}" for p in args.ps) + " | " + " | ".join(f"amplify p={p}" for p in args.ps)
    print(header + (" | attribution s |" if seconds else " |"))
    print("|" + " --- |" * (1 + 2 * len(args.ps) + bool(seconds)))
    for method in results:
        cells = [
            f"{m:.3f} +- {e:.3f}" for condition in ("suppress", "amplify") for m, e in (interval(results[method][condition][p]) for p in args.ps)
        ]
        cells += [f"{statistics.fmean(seconds[method]):.1f}"] if seconds else []
        print(f"| {method} | " + " | ".join(cells) + " |")
    if not length_curve:
        print(f"\nwall time {summary['wall_time_s']} s")
        return
    print(
        f"\nLength control: top-{args.length_k} IPG length neurons of block {args.length_layer} vs {args.length_k} random ones "
        "(sampled, temperature 0.7, 4 per problem)"
    )
    print("| gamma | IPG: mean length | IPG: accuracy | IPG: reflection | random: mean length | random: accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in length_curve:
        ipg, rnd = row["ipg"], row["random"]
        print(
            f"| {row['gamma']} | {ipg['reasoning_length_mean']:.1f} | {ipg['accuracy']:.3f} | {ipg['reflection_rate']:.3f} | "
            f"{rnd['reasoning_length_mean']:.1f} | {rnd['accuracy']:.3f} |"
        )
    print(f"\nwall time {summary['wall_time_s']} s")


def load_summary(path: Path) -> dict:
    """A ``results.json`` written by this script, with the p keys back to integers."""
    summary = json.loads(path.read_text())
    for curves in summary["results"].values():
        for condition, by_p in curves.items():
            curves[condition] = {int(p): values for p, values in by_p.items()}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY_REASONER_PATH)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ps", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--support", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="trajectories per support problem (N)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rule", default="gauss_legendre")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--length-layer", type=int, default=3)
    parser.add_argument("--length-k", type=int, default=4)
    parser.add_argument("--ipg-variants", nargs="*", default=[], choices=list(VARIANTS), help="also IPG with these estimator settings")
    parser.add_argument("--sae-methods", nargs="*", default=[], choices=METHODS, help="also rank the features of --sae with these methods")
    parser.add_argument("--sae", default=TINY_REASONER_SAE_PATH, help="SAE directory whose features --sae-methods rank")
    parser.add_argument("--sae-steps", type=int, default=32, help="quadrature points over SAE features (a rougher path)")
    parser.add_argument("--skip-length", action="store_true", help="leave out the length-control curve")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out", default="benchmarks/localisation")
    parser.add_argument("--from-results", action="store_true", help="redraw the figure and tables from OUT/results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.from_results:
        summary = load_summary(out / "results.json")
        write_figure(summary, out)
        print_tables(summary)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()

    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    device = torch.device(args.device)
    model.to(device)
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=160, batch_size=128)
    test_data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=args.test, num_val=0, num_train=0, batch_size=128)
    test_data.connect(tokenizer)
    test_batches = list(test_data.test_dataloader())
    base = evaluate_generations(model, tokenizer, test_batches, greedy).metrics

    def attribute(method: str, seed: int, reward: str = "accuracy", layer: int = args.layer, family: str = "mlp_neuron", variant: str | None = None):
        # The seeded stream deals test problems first, then validation: support sets never overlap the
        # test problems, and each seed takes the next `support` problems of the validation stream.
        support = ReasoningDataModule(
            synthetic_task=TINY_REASONER_TASK, num_test=args.test, num_val=args.support * (seed + 1), num_train=0, batch_size=16
        )
        support.setup()
        support.examples["val"] = support.examples["val"][args.support * seed :]
        overrides = dict(VARIANTS[variant]) if variant else {}
        num_samples = overrides.pop("num_samples", args.num_samples)
        module = IPGAttribution.for_model(
            model,
            tokenizer,
            method=method,
            reward=reward,
            families=[family],
            layers=[layer],
            saes=[args.sae] if family == "sae_feature" else [],
            steps=args.sae_steps if family == "sae_feature" else args.steps,
            rule=args.rule,
            sampling=SamplingConfig(num_samples=num_samples, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=64, seed=seed),
            chunk_size=32,
            **overrides,
        )
        return run_attribution(module, support, enable_progress_bar=False, device=device)

    rows = [(method, method, "mlp_neuron", None) for method in args.methods]
    rows += [(f"ipg [{variant}]", "ipg", "mlp_neuron", variant) for variant in args.ipg_variants]
    rows += [(f"{method} [SAE]", method, "sae_feature", None) for method in args.sae_methods]
    results: dict[str, dict[str, dict[int, list[float]]]] = {
        row: {"suppress": {p: [] for p in args.ps}, "amplify": {p: [] for p in args.ps}} for row, *_ in rows
    }
    seconds: dict[str, list[float]] = {row: [] for row, *_ in rows}
    for seed in range(args.seeds):
        for row, method, family, variant in rows:
            started = time.perf_counter()
            report = attribute(method, seed, family=family, variant=variant)
            seconds[row].append(round(time.perf_counter() - started, 2))
            for p in args.ps:
                components = report.select(k=p)
                for condition, gamma in (("suppress", 0.0), ("amplify", 1.5)):
                    gates = gates_for_components(model, components, gamma).to(device)
                    accuracy = evaluate_generations(model, tokenizer, test_batches, greedy, gates).metrics["accuracy"]
                    results[row][condition][p].append(accuracy)
            print(
                f"seed {seed} {row:<19} suppress {[results[row]['suppress'][p][-1] for p in args.ps]} "
                f"amplify {[results[row]['amplify'][p][-1] for p in args.ps]}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    sampled = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=160, batch_size=128)
    selections = (
        {}
        if args.skip_length
        else {
            "ipg": attribute("ipg", 0, reward="reasoning_length", layer=args.length_layer).select(k=args.length_k),
            "random": attribute("random", 0, layer=args.length_layer).select(k=args.length_k),
        }
    )
    length_curve = []
    for gamma in args.gammas if selections else []:
        row = {"gamma": gamma}
        for name, components in selections.items():
            metrics = evaluate_generations(model, tokenizer, test_batches, sampled, gates_for_components(model, components, gamma).to(device)).metrics
            row[name] = {key: metrics[key] for key in ("reasoning_length_mean", "accuracy", "reflection_rate")}
        length_curve.append(row)
        print(f"gamma {gamma}: {row}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "base": base,
        "settings": vars(args),
        "results": results,
        "attribution_seconds": seconds,
        "length_components": selections,
        "length_curve": length_curve,
        "wall_time_s": round(time.perf_counter() - start),
    }
    atomic_write_json(out / "results.json", summary)
    write_figure(summary, out)
    print_tables(summary)


if __name__ == "__main__":
    main()
