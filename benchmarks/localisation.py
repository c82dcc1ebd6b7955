"""Which selection method localises reasoning best? IPG against the baselines, on three testbeds.

On a testbed (``--testbed sft|rl|smollm2``, see ``benchmarks/testbeds.py``), for each row (a method
of ``--methods``, an estimator variant of ``--ipg-variants``, an SAE row of ``--sae-methods``) and seed:

- **accuracy**: attribute accuracy on the support problems, take the top-p MLP neurons of one block,
  and measure held-out greedy accuracy with them suppressed (gate 0) and amplified (gate 1.5);
- **length**: attribute reasoning length at the length block (``mean_diff``: long against short
  answers to the same question), take the top-k neurons, and measure mean reasoning length and
  accuracy of sampled completions (temperature 0.7, 4 per problem, the same seeds in every
  condition) with the neurons scaled by each gamma.

A better method moves the behaviour more with fewer components; the tables give each row's
attribution wall time per seed, to compare at equal cost. Seeds change the support problems and the
sampling; intervals are mean +- 1.96 standard errors. Support problems come after the test problems
in the task's seeded stream, so the two never overlap. ``--support-task``/``--test-task`` apply
components selected on one task to another task of the same model (transfer); ``--rankings-from
DIR`` takes each cell's ranking from an in-task run in DIR instead of attributing again (the same
support problems and settings, so only the test task differs, at the cost of the evaluations
alone). ``ig_reference`` needs reference solutions: on a task without them its row says so.

Estimator variants (``--ipg-variants``): ``local`` credit, ``retries`` (redraw zero-signal groups),
``token_mean`` (the length-normalised surrogate), ``grpo`` advantages, ``resample`` estimation,
N = 8 or 16; ``grad_x_act`` is q = 1, and ``--variant-methods ipg grad_x_act`` gives it the same variants
(a ``grad_x_act [token_mean]`` row, for instance). SAE rows rank the
features of ``--sae`` (accuracy only: the shipped SAE reads block 2's residual output).

Resumable: each finished (behaviour, row, seed) cell is written to ``OUT/results.json`` at once, and a
rerun with the same settings measures only the missing cells of the rows and seeds it names (more or
fewer than before: the file keeps every row and seed it has held, and its tables say which cells are
missing); ``--restart`` replaces a run with other settings. ``--from-results`` redraws tables and figure.

Run: ``python benchmarks/localisation.py --testbed sft`` (``--help`` for knobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple, get_args

import torch
from testbeds import TESTBEDS

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.attribution.report import AttributionReport, UninformativeReportError
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import DTYPES, load_model_and_tokenizer
from ipg_lightning.outputs import atomic_write_json
from ipg_lightning.rollout.engine_names import Engine
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import gates_for_components
from ipg_lightning.zoo.reasoner import TINY_REASONER_SAE_PATH

METHODS = ("ipg", "grad_x_act", "ig_reference", "mean_diff", "activation", "random")
BEHAVIOURS = ("accuracy", "length")
#: Estimator variants, as overrides of a gradient method's settings (``--ipg-variants``, for ``--variant-methods``).
VARIANTS = {
    "local": {"credit": "local"},
    "retries": {"signal_retries": 4},
    "token_mean": {"surrogate": "token_mean"},
    "grpo": {"advantage": "grpo"},
    "resample": {"estimation": "resample"},
    "n8": {"num_samples": 8},
    "n16": {"num_samples": 16},
}
#: Settings an in-task run must share with a run that takes its rankings (``--rankings-from``); its
#: support problems are its own (they follow its test problems), whatever this run's ``--test``.
RANKING_SETTINGS = (
    *("testbed", "support_task", "layer", "length_layer", "support", "num_samples"),
    *("steps", "rule", "sae", "sae_steps", "engine", "dtype"),
)
#: Settings a resumed run may change: which cells to measure, and where and how to show them.
NOT_MEASUREMENT = {"out", "from_results", "restart", "seeds", "methods", "ipg_variants", "variant_methods", "sae_methods", "behaviours"}
#: The gradient methods an estimator variant can apply to (``--variant-methods``).
VARIANT_METHODS = ("ipg", "grad_x_act")
#: Settings that choose the rows a run measures, in their canonical order: a resumed run measures the rows it is
#: given, and its results.json keeps every row it has held (and the most seeds), so tables and figure lose none.
ROW_OPTIONS = {
    "behaviours": BEHAVIOURS,
    "methods": METHODS,
    "sae_methods": METHODS,
    "ipg_variants": tuple(VARIANTS),
    "variant_methods": VARIANT_METHODS,
}
FORMAT = 2
ACCURACY_GATES = {"suppress": 0.0, "amplify": 1.5}


class Row(NamedTuple):
    """One line of the tables: a method, on a site family, with an optional estimator variant."""

    name: str
    method: str
    family: str
    variant: str | None


def rows_of(settings: dict[str, Any], behaviour: str) -> list[Row]:
    """The rows a run measures for one behaviour (SAE rows for accuracy only)."""
    rows = [Row(method, method, "mlp_neuron", None) for method in settings["methods"]]
    for method in settings.get("variant_methods", ["ipg"]):  # runs from before the choice varied IPG alone
        rows += [Row(f"{method} [{variant}]", method, "mlp_neuron", variant) for variant in settings["ipg_variants"]]
    if behaviour == "accuracy":
        rows += [Row(f"{method} [SAE]", method, "sae_feature", None) for method in settings["sae_methods"]]
    return rows


def cells_of(settings: dict[str, Any]) -> list[str]:
    """The keys (behaviour|row|seed) of every cell a run with these settings measures, in the order it measures them."""
    return [f"{b}|{row.name}|{seed}" for seed in range(settings["seeds"]) for b in settings["behaviours"] for row in rows_of(settings, b)]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95 % interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


class Localisation:
    """One benchmark run: the testbed's model, its held-out problems, and the cells measured so far."""

    def __init__(self, settings: dict[str, Any], summary: dict[str, Any]) -> None:
        self.settings, self.summary = settings, summary
        self.rankings = rankings_of(settings) if settings.get("rankings_from") else None  # refused before the model loads
        self.testbed = TESTBEDS[settings["testbed"]]
        self.support_task = self.testbed.tasks[settings["support_task"]]
        self.model, self.tokenizer = load_model_and_tokenizer(self.testbed.model, settings["dtype"])
        self.device = torch.device(settings["device"])
        self.model.to(self.device)
        tokens = self.testbed.max_new_tokens
        engine = settings["engine"]
        self.greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=tokens, batch_size=128, engine=engine)
        self.sampled = SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=tokens, batch_size=128, seed=0, engine=engine)
        test = self.testbed.tasks[settings["test_task"]].data(num_test=settings["test"], num_val=0, batch_size=128)
        test.connect(self.tokenizer)
        self.test_batches = list(test.test_dataloader())

    def evaluate(self, sampling: SamplingConfig, components: list[str] | None = None, gamma: float = 1.0) -> dict[str, float]:
        """Metrics of the test problems with ``components`` scaled by ``gamma`` (none: the model as it is)."""
        gates = gates_for_components(self.model, components, gamma).to(self.device) if components else None
        return evaluate_generations(self.model, self.tokenizer, self.test_batches, sampling, gates).metrics

    def attribute(self, row: Row, seed: int, behaviour: str) -> AttributionReport:
        """Rank the row's components on seed's support problems (the next ``support`` of the validation stream)."""
        settings = self.settings
        support = self.support_task.data(num_test=settings["test"], num_val=settings["support"] * (seed + 1), batch_size=16)
        support.setup()
        support.examples["val"] = support.examples["val"][settings["support"] * seed :]
        if row.method == "ig_reference" and not all(example.solution for example in support.examples["val"]):
            raise UninformativeReportError(f"not applicable: task {settings['support_task']!r} has no reference solutions")
        # A row without a variant is the paper's estimator: the summed surrogate, whatever the library's default.
        overrides = {"surrogate": "sum", **(VARIANTS[row.variant] if row.variant else {})}
        num_samples = overrides.pop("num_samples", settings["num_samples"])
        sae = row.family == "sae_feature"
        module = IPGAttribution.for_model(
            self.model,
            self.tokenizer,
            method=row.method,
            reward="accuracy" if behaviour == "accuracy" else "reasoning_length",
            families=[row.family],
            layers=[settings["layer"] if behaviour == "accuracy" else settings["length_layer"]],
            saes=[settings["sae"]] if sae else [],
            steps=settings["sae_steps"] if sae else settings["steps"],
            rule=settings["rule"],
            sampling=SamplingConfig(
                num_samples=num_samples,
                temperature=0.7,
                top_p=1.0,
                max_new_tokens=self.testbed.max_new_tokens,
                batch_size=64,
                seed=seed,
                engine=settings["engine"],
            ),
            chunk_size=32,
            **overrides,
        )
        return run_attribution(module, support, enable_progress_bar=False, device=self.device)

    def measure(self, behaviour: str, row: Row, seed: int) -> dict[str, Any]:
        """One cell: the row's components on one seed, and the behaviour under each gate setting."""
        started = time.perf_counter()
        if self.rankings is not None:
            source = self.rankings[f"{behaviour}|{row.name}|{seed}"]
            if "not_applicable" in source:
                return dict(source)
            ranking, cell = source["components"], {"seconds": source["seconds"], "ranking_from": self.settings["rankings_from"]}
        else:
            try:
                k = max(self.settings["ps"]) if behaviour == "accuracy" else self.settings["length_k"]
                ranking = self.attribute(row, seed, behaviour).select(k=k)
            except UninformativeReportError as error:
                return {"not_applicable": str(error)}
            cell = {"seconds": round(time.perf_counter() - started, 2)}
        if behaviour == "accuracy":
            cell["components"] = ranking[: max(self.settings["ps"])]
            for condition, gamma in ACCURACY_GATES.items():
                cell[condition] = {str(p): self.evaluate(self.greedy, cell["components"][:p], gamma)["accuracy"] for p in self.settings["ps"]}
        else:
            cell["components"] = ranking[: self.settings["length_k"]]
            gammas = [gamma for gamma in self.settings["gammas"] if gamma != 1.0]  # gamma 1 is the base
            cell["gammas"] = {str(gamma): _length_metrics(self.evaluate(self.sampled, cell["components"], gamma)) for gamma in gammas}
        return cell

    def run(self, out: Path) -> None:
        """Measure the base and every missing cell, saving after each one (wall time adds to an earlier run's)."""
        summary, settings = self.summary, self.settings
        started, earlier = time.perf_counter(), summary["wall_time_s"]
        if "greedy" not in summary["base"]:
            summary["base"]["greedy"] = self.evaluate(self.greedy)
            print(f"{'base (greedy)':<32} accuracy {summary['base']['greedy']['accuracy']:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
        if "length" in settings["behaviours"] and "sampled" not in summary["base"]:
            summary["base"]["sampled"] = _length_metrics(self.evaluate(self.sampled))
            sampled = summary["base"]["sampled"]
            print(f"{'base (sampled)':<32} length {sampled['reasoning_length_mean']:.1f}  ({time.perf_counter() - started:.0f} s)", flush=True)
        for seed in range(settings["seeds"]):
            for behaviour in settings["behaviours"]:
                for row in rows_of(settings, behaviour):
                    key = f"{behaviour}|{row.name}|{seed}"
                    if key in summary["cells"]:
                        continue
                    summary["cells"][key] = self.measure(behaviour, row, seed)
                    summary["wall_time_s"] = round(earlier + time.perf_counter() - started)
                    atomic_write_json(out / "results.json", summary)
                    print(f"{key:<32} {_cell_line(summary['cells'][key])}  ({time.perf_counter() - started:.0f} s)", flush=True)


def rankings_of(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cells of the in-task run at ``settings["rankings_from"]``, checked to rank what this run would rank."""
    source = load_summary(Path(settings["rankings_from"]) / "results.json")
    recorded = {"engine": "hf", **source["settings"]}
    differ = [key for key in RANKING_SETTINGS if recorded.get(key) != settings.get(key)]
    if differ:
        sys.exit(f"{settings['rankings_from']} ranked with other settings ({', '.join(differ)}): its rankings are not this run's")
    wanted = cells_of(settings)
    missing = [key for key in wanted if key not in source["cells"]]
    if missing:
        sys.exit(f"{settings['rankings_from']} has no cells {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: measure them there first")
    short = [key for key, cell in source["cells"].items() if "components" in cell and key.startswith("accuracy|")]
    short = [key for key in short if len(source["cells"][key]["components"]) < max(settings["ps"])]
    if short or recorded.get("length_k", settings["length_k"]) < settings["length_k"]:
        sys.exit(f"{settings['rankings_from']} kept shorter rankings than --ps / --length-k ask for")
    return source["cells"]


def _length_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {key: metrics[key] for key in ("reasoning_length_mean", "accuracy", "reflection_rate")}


def _cell_line(cell: dict[str, Any]) -> str:
    if "not_applicable" in cell:
        return cell["not_applicable"]
    if "gammas" in cell:
        return "lengths " + " ".join(f"{g}:{m['reasoning_length_mean']:.1f}" for g, m in cell["gammas"].items())
    return " ".join(f"{condition} {list(cell[condition].values())}" for condition in ACCURACY_GATES)


def collect(summary: dict[str, Any], behaviour: str) -> dict[str, dict[str, Any]]:
    """Per row: values over seeds of each measured point, its attribution seconds, or why it does not apply."""
    settings = summary["settings"]
    table: dict[str, dict[str, Any]] = {}
    for row in rows_of(settings, behaviour):
        cells = [summary["cells"][key] for seed in range(settings["seeds"]) if (key := f"{behaviour}|{row.name}|{seed}") in summary["cells"]]
        if not cells:
            continue
        if "not_applicable" in cells[0]:
            table[row.name] = {"not_applicable": cells[0]["not_applicable"]}
            continue
        points: dict[str, list[float]] = {}
        for cell in cells:
            if behaviour == "accuracy":
                for condition in ACCURACY_GATES:
                    for p, value in cell[condition].items():
                        points.setdefault(f"{condition} p={p}", []).append(value)
            else:
                for gamma, metrics in cell["gammas"].items():
                    for name in ("reasoning_length_mean", "accuracy"):
                        points.setdefault(f"{name} gamma={gamma}", []).append(metrics[name])
        table[row.name] = {"points": points, "seconds": [cell["seconds"] for cell in cells]}
    return table


def print_tables(summary: dict[str, Any]) -> None:
    """The Markdown tables recorded in ``benchmarks/RESULTS.md``."""
    settings, base = summary["settings"], summary["base"]
    testbed = TESTBEDS[settings["testbed"]]
    transfer = "" if settings["support_task"] == settings["test_task"] else f", selected on {settings['support_task']}"
    print(
        f"\n{settings['testbed']} testbed ({testbed.description}), task {settings['test_task']}{transfer}: "
        f"{settings['test']} held-out problems, support {settings['support']} problems x N={settings['num_samples']}, "
        f"{settings['seeds']} seeds{_partial(summary)}"
    )
    greedy = base["greedy"]
    print(f"base (greedy): accuracy {greedy['accuracy']:.3f}, mean length {greedy['reasoning_length_mean']:.1f}")
    if "accuracy" in settings["behaviours"]:
        print(f"\nAccuracy: top-p neurons of block {settings['layer']} suppressed (gate 0) and amplified (gate 1.5), greedy")
        columns = [f"{condition} p={p}" for condition in ACCURACY_GATES for p in settings["ps"]]
        _print_table(collect(summary, "accuracy"), columns, columns)
    if "length" in settings["behaviours"]:
        sampled = base["sampled"]
        gammas = [str(g) for g in settings["gammas"] if g != 1.0]
        print(
            f"\nLength: top-{settings['length_k']} length neurons of block {settings['length_layer']} scaled by gamma, sampled "
            f"(temperature 0.7, 4 per problem); at gamma 1: mean length {sampled['reasoning_length_mean']:.1f}, "
            f"accuracy {sampled['accuracy']:.3f}, reflection {sampled['reflection_rate']:.3f}"
        )
        table = collect(summary, "length")
        print("\nmean reasoning length (tokens)")
        _print_table(table, [f"reasoning_length_mean gamma={g}" for g in gammas], [f"gamma={g}" for g in gammas], digits=1)
        print("\naccuracy")
        _print_table(table, [f"accuracy gamma={g}" for g in gammas], [f"gamma={g}" for g in gammas])
    print(f"\nwall time {summary['wall_time_s']} s")


def _partial(summary: dict[str, Any]) -> str:
    missing = missing_cells(summary)
    return f" (PARTIAL: {len(missing)} cells missing, e.g. {missing[0]})" if missing else ""


def _print_table(table: dict[str, dict[str, Any]], keys: list[str], headers: list[str], digits: int = 3) -> None:
    print("| method | " + " | ".join(headers) + " | attribution s |")
    print("|" + " --- |" * (len(keys) + 2))
    for name, row in table.items():
        if "not_applicable" in row:
            print(f"| {name} | " + " | ".join(["n/a"] * len(keys)) + f" | {row['not_applicable']} |")
            continue
        cells = [f"{m:.{digits}f} +- {e:.{digits}f}" for m, e in (interval(row["points"][key]) for key in keys)]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.fmean(row['seconds']):.1f} |")


def write_figure(summary: dict[str, Any], out: Path) -> None:
    """Suppression and amplification curves, and the length-control curves, per row (atomically)."""
    settings = summary["settings"]
    panels = [("accuracy", condition) for condition in ACCURACY_GATES if "accuracy" in settings["behaviours"]]
    panels += [("length", "length")] if "length" in settings["behaviours"] else []
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.8 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (behaviour, panel) in zip(axes[0], panels, strict=True):
        table = collect(summary, behaviour)
        if behaviour == "accuracy":
            xs, keys = settings["ps"], [f"{panel} p={p}" for p in settings["ps"]]
            axis.axhline(summary["base"]["greedy"]["accuracy"], color="grey", linestyle="--", label="base")
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(p) for p in xs], minor=False)
            axis.minorticks_off()
            axis.set(xlabel="p (top components)", ylabel="held-out accuracy", title=f"{panel} (gate {ACCURACY_GATES[panel]})")
        else:
            xs = [g for g in settings["gammas"] if g != 1.0]
            keys = [f"reasoning_length_mean gamma={g}" for g in xs]
            axis.axhline(summary["base"]["sampled"]["reasoning_length_mean"], color="grey", linestyle="--", label="base")
            axis.set(xlabel=f"gamma on {settings['length_k']} block-{settings['length_layer']} neurons", ylabel="mean reasoning length")
        for name, row in table.items():
            if "points" in row:
                means, errors = zip(*(interval(row["points"][key]) for key in keys), strict=True)
                axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=name)
        axis.legend(fontsize=7)  # each panel's own rows (variants may be measured for one behaviour only)
    figure.tight_layout()
    figure.savefig(out / "localisation.png.tmp", dpi=110, format="png")
    (out / "localisation.png.tmp").replace(out / "localisation.png")


def load_summary(path: Path) -> dict[str, Any]:
    """A ``results.json`` written by this version of the script; exit with a one-line reason otherwise."""
    if not path.is_file():
        sys.exit(f"{path} does not exist: run the benchmark with this --out first")
    summary = json.loads(path.read_text())
    if summary.get("format") != FORMAT:
        sys.exit(f"{path} was written by an older version of this benchmark; its tables are recorded in benchmarks/RESULTS.md")
    return summary


def resume_or_start(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """The summary of an earlier run with the same measurement settings, or a new one."""
    path = out / "results.json"
    if path.exists() and not settings["restart"]:
        summary = load_summary(path)
        recorded = {"engine": "hf", **summary["settings"]}  # runs from before the engine choice sampled with hf
        differ = sorted(key for key in settings.keys() - NOT_MEASUREMENT if recorded.get(key) != settings[key])
        if differ:
            sys.exit(f"{path} holds a run with other settings ({', '.join(differ)}): pass --restart to replace it, or another --out")
        summary["settings"] = held_settings(recorded, settings)
        return summary
    return {"format": FORMAT, "settings": settings, "base": {}, "cells": {}, "complete": False, "wall_time_s": 0}


def held_settings(recorded: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """``requested`` with the rows and seeds of an earlier run's ``recorded`` settings added back."""
    held = {**requested, "seeds": max(recorded["seeds"], requested["seeds"])}
    for key, order in ROW_OPTIONS.items():
        names = {*recorded.get(key, ["ipg"] if key == "variant_methods" else []), *requested[key]}  # older runs varied IPG alone
        held[key] = [name for name in order if name in names]
    return held


def missing_cells(summary: dict[str, Any]) -> list[str]:
    """The cells the saved settings name that are not measured yet."""
    return [key for key in cells_of(summary["settings"]) if key not in summary["cells"]]


def parse_args() -> argparse.Namespace:
    """The command line; ``--testbed`` fills the testbed's blocks and tasks unless they are given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default="sft", choices=sorted(TESTBEDS))
    parser.add_argument("--support-task", help="task the components are selected on (default: the testbed's main task)")
    parser.add_argument("--test-task", help="task they are measured on (default: the support task)")
    parser.add_argument("--behaviours", nargs="+", default=list(BEHAVIOURS), choices=BEHAVIOURS)
    parser.add_argument("--layer", type=int, help="block whose MLP neurons are ranked for accuracy (default: the testbed's)")
    parser.add_argument("--length-layer", type=int, help="block whose MLP neurons are ranked for length (default: the testbed's)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ps", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--length-k", type=int, default=4)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--support", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="trajectories per support problem (N)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rule", default="gauss_legendre")
    parser.add_argument("--ipg-variants", nargs="*", default=[], choices=list(VARIANTS), help="also the --variant-methods with these settings")
    parser.add_argument(
        "--variant-methods", nargs="+", default=["ipg"], choices=VARIANT_METHODS, help="methods the --ipg-variants apply to (grad_x_act: q = 1)"
    )
    parser.add_argument("--sae-methods", nargs="*", default=[], choices=METHODS, help="also rank the features of --sae with these methods")
    parser.add_argument("--sae", default=TINY_REASONER_SAE_PATH, help="SAE directory whose features --sae-methods rank")
    parser.add_argument("--sae-steps", type=int, default=32, help="quadrature points over SAE features (a rougher path)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--engine", default="hf", choices=get_args(Engine), help="what samples (docs/engines.md)")
    parser.add_argument("--rankings-from", help="take each cell's ranking from the in-task run in this directory (transfer)")
    parser.add_argument("--out", help="output directory (default: benchmarks/localisation_<testbed>)")
    parser.add_argument("--restart", action="store_true", help="replace the results in OUT instead of resuming them")
    parser.add_argument("--from-results", action="store_true", help="redraw the figure and tables from OUT/results.json")
    args = parser.parse_args()
    testbed = TESTBEDS[args.testbed]
    args.support_task = args.support_task or next(iter(testbed.tasks))
    args.test_task = args.test_task or args.support_task
    for task in (args.support_task, args.test_task):
        if task not in testbed.tasks:
            parser.error(f"testbed {args.testbed!r} has tasks {sorted(testbed.tasks)}, not {task!r}")
    args.layer = testbed.layer if args.layer is None else args.layer
    args.length_layer = testbed.length_layer if args.length_layer is None else args.length_layer
    args.variant_methods = list(dict.fromkeys(args.variant_methods))
    if args.variant_methods != ["ipg"] and not args.ipg_variants:
        parser.error("--variant-methods names the methods the --ipg-variants apply to: give --ipg-variants too")
    args.out = args.out or f"benchmarks/localisation_{args.testbed}"
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.from_results:
        summary = load_summary(out / "results.json")
        write_figure(summary, out)
        print_tables(summary)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    summary = resume_or_start(vars(args), out)
    summary["complete"] = False
    Localisation(vars(args), summary).run(out)
    summary["complete"] = not missing_cells(summary)
    atomic_write_json(out / "results.json", summary)
    write_figure(summary, out)
    print_tables(summary)


if __name__ == "__main__":
    main()
