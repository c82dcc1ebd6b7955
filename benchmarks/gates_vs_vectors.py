"""Gates or steering vectors: which moves reasoning length and accuracy more, built from the same data?

On a testbed (``--testbed sft|rl|smollm2``, ``benchmarks/testbeds.py``), for each behaviour and seed,
every row is built from the same support problems (``--support`` of them, N = ``--num-samples``
trajectories each at temperature 0.7) and then tuned and measured the same way:

- **gates** (``ipg``, ``grad_x_act``): attribute the behaviour's reward over the MLP neurons of the
  testbed's block for it, and scale the top k by gamma (every k of ``--ks`` with every gamma of ``--gammas``);
- **vectors**, added to that block's output: ``contrast`` (above minus below each problem's mean
  reward: correct minus incorrect for accuracy, long minus short for length), ``reflection``
  (execution minus reflection thoughts, SEAL-style; needs no reward; added at every position),
  ``seal`` (the same vector added at generated tokens only, as SEAL adds it; sampled on the HF engine
  even with ``--engine vllm``, which adds vectors at every position only) and ``sae`` (the decoder
  direction of the SAE feature IPG ranks first, where the testbed's SAE reads; rows without an SAE
  say so) and ``learned`` (trained from zero by policy gradient on the behaviour's reward with
  ``ipg steer``'s module, ``--learn-epochs`` passes over the support problems at the same N: more
  samples than the other rows draw). Each vector is scaled to unit norm and added at strengths ``alpha = r * |h|`` for each r
  of ``--strengths``, where ``|h|`` is the mean norm of that block's output over the base model's
  generated tokens: the same scale for every source, both signs. The learned vector is also tried at
  the norm it was trained to (r = +-its norm / ``|h|``), which the fixed strengths may miss by far on a
  wide model.

Accuracy is measured greedily; reasoning length on 4 samples per problem at temperature 0.7 (the
same seeds in every condition), since a small reasoner's greedy traces are already as short as they
get. Every setting is measured on ``--select`` selection problems; the setting a row keeps is
chosen there: for **length**, the one that shortens mean reasoning most while accuracy stays within
``--tolerance`` of the base (none qualifying: the row keeps the base); for **accuracy**, the most
accurate (ties: the weaker intervention). The kept setting is then measured once on ``--test`` held-out
problems, so the test set never picks a winner. Test, selection and support problems are disjoint
(they come in that order from the task's seeded stream; each seed takes the next support problems).

The tables give, per row, the mean over seeds with a 95 % interval of the test change against the
base: tokens saved and the accuracy change for length; the accuracy change and the length change
for accuracy; and the seconds to build the row (attribution, or sampling and reading for a vector).

Resumable: each (behaviour, row, seed) cell is written to ``OUT/results.json`` when it finishes.

Run: ``python benchmarks/gates_vs_vectors.py --testbed sft`` (``--help`` for knobs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, get_args

import lightning as L
import torch
from localisation import interval
from testbeds import TESTBEDS

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.attribution.activations import mean_completion_activations
from ipg_lightning.attribution.estimator import SurrogateChoice
from ipg_lightning.attribution.methods import resolve_surrogate
from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.model.sites import discover_sites
from ipg_lightning.outputs import atomic_write_json
from ipg_lightning.rollout.engine_names import Engine
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import load_sae
from ipg_lightning.steering import gates_for_components
from ipg_lightning.steering.learned import GateSteering
from ipg_lightning.steering.vector_sources import NoContrastError, contrast_vectors, reflection_vectors, sae_direction_vectors
from ipg_lightning.steering.vector_training import VectorTraining
from ipg_lightning.vectors import SteeringVectors
from ipg_lightning.zoo.reasoner import TINY_REASONER_SAE_PATH

GATE_ROWS = ("ipg", "grad_x_act")
VECTOR_ROWS = ("contrast", "reflection", "seal", "sae", "learned")
BEHAVIOURS = ("length", "accuracy")
REWARDS = {"length": "reasoning_length", "accuracy": "accuracy"}
#: The SAE each testbed's ``sae`` row reads (None: the row is not applicable).
SAES = {"sft": TINY_REASONER_SAE_PATH, "rl": TINY_REASONER_SAE_PATH, "smollm2": None}
#: Settings a resumed run may change: which cells to measure, and where to write them.
NOT_MEASUREMENT = {"out", "from_results", "seeds", "rows", "behaviours"}
FORMAT = 1


class Comparison:
    """One run on one testbed: the model, its selection and test problems, and the cells measured so far."""

    def __init__(self, settings: dict[str, Any], summary: dict[str, Any]) -> None:
        self.settings, self.summary = settings, summary
        self.testbed = TESTBEDS[settings["testbed"]]
        self.task = next(iter(self.testbed.tasks.values()))
        # every seed's support problems must exist: a task with too few distinct problems fails here, before any cell
        self.task.data(num_test=settings["test"], num_val=settings["select"] + settings["support"] * settings["seeds"], batch_size=128).setup()
        self.model, self.tokenizer = load_model_and_tokenizer(self.testbed.model)
        tokens, engine = self.testbed.max_new_tokens, settings["engine"]
        self.greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=tokens, batch_size=128, engine=engine)
        #: Length is measured on sampled completions (greedy traces of a small reasoner are already as short as they get).
        self.decoding = {
            "accuracy": self.greedy,
            "length": SamplingConfig(num_samples=4, temperature=0.7, top_p=1.0, max_new_tokens=tokens, batch_size=128, seed=0, engine=engine),
        }
        data = self.task.data(num_test=settings["test"], num_val=settings["select"], batch_size=128)
        data.connect(self.tokenizer)
        self.batches = {"test": list(data.test_dataloader()), "select": list(data.val_dataloader())}

    def layer(self, behaviour: str) -> int:
        """The block whose neurons are gated, and whose output vectors are added to, for ``behaviour``."""
        return self.testbed.layer if behaviour == "accuracy" else self.testbed.length_layer

    def evaluate(self, behaviour: str, split: str, gates: Any = None, vectors: SteeringVectors | None = None) -> dict[str, float]:
        """Accuracy and mean reasoning length on ``split`` with ``gates`` and ``vectors`` attached, decoded as ``behaviour`` is measured."""
        sampling = self.decoding[behaviour]
        if vectors is not None and vectors.positions == "generated":  # the vLLM engine adds vectors at every position only
            sampling = replace(sampling, engine="hf")
        metrics = evaluate_generations(self.model, self.tokenizer, self.batches[split], sampling, gates, vectors).metrics
        return {"accuracy": metrics["accuracy"], "length": metrics["reasoning_length_mean"], "reflection_rate": metrics["reflection_rate"]}

    def support(self, seed: int) -> tuple[ReasoningDataModule, SamplingConfig]:
        """Seed's support problems (after the test and selection problems, the next ``support`` for each seed) and how they are sampled."""
        settings = self.settings
        offset = settings["select"] + settings["support"] * seed
        data = self.task.data(num_test=settings["test"], num_val=offset + settings["support"], batch_size=16)
        data.setup()
        data.examples["val"] = data.examples["val"][offset:]
        data.connect(self.tokenizer)
        tokens = self.testbed.max_new_tokens
        sampling = SamplingConfig(
            num_samples=settings["num_samples"],
            temperature=0.7,
            top_p=1.0,
            max_new_tokens=tokens,
            batch_size=64,
            seed=seed,
            engine=settings["engine"],
        )
        return data, sampling

    def base(self) -> dict[str, Any]:
        """The base model on both splits, and the mean norm of each block's output over its generated tokens (the vectors' scale)."""
        if "base" not in self.summary:
            base: dict[str, Any] = {b: {split: self.evaluate(b, split) for split in ("select", "test")} for b in BEHAVIOURS}
            prompts = [prompt for batch in self.batches["select"] for prompt in batch["prompt"]]
            trajectories = sample_trajectories(self.model, self.tokenizer, prompts, self.greedy)
            sites = discover_sites(self.model, ["resid_post"])
            norms = mean_completion_activations(self.model, sites, trajectories, 16, read=lambda _, h: h.norm(dim=-1, keepdim=True))
            base["norms"] = {name: float(values.mean()) for name, values in norms.items()}
            self.summary["base"] = base
        return self.summary["base"]

    def attribute(self, method: str, behaviour: str, seed: int, sae: str | None = None) -> AttributionReport:
        """Rank the MLP neurons of the behaviour's block (or the features of ``sae``) by ``method`` on seed's support problems."""
        data, sampling = self.support(seed)
        module = IPGAttribution.for_model(
            self.model,
            self.tokenizer,
            method=method,
            reward=REWARDS[behaviour],
            families=["sae_feature" if sae else "mlp_neuron"],
            layers=None if sae else [self.layer(behaviour)],
            saes=[sae] if sae else [],
            steps=32 if sae else 16,
            rule="right",  # the rule its recorded runs used (the library's default before 2026-12-06)
            surrogate=self.settings["surrogate"],
            sampling=sampling,
            chunk_size=32,
        )
        return run_attribution(module, data, enable_progress_bar=False)

    def build(self, behaviour: str, row: str, seed: int) -> list[Setting] | str:
        """Build the row on seed's support problems: every setting it is swept over (or why it does not apply)."""
        if row in GATE_ROWS:
            ranked = self.attribute(row, behaviour, seed).select(k=max(self.settings["ks"]))
            return [Setting({"k": k, "gamma": gamma}, ranked[:k], None) for k in self.settings["ks"] for gamma in self.settings["gammas"]]
        data, sampling = self.support(seed)
        batch = data.full_batch("val")
        layer = self.layer(behaviour)
        try:
            if row == "contrast":
                reward = REWARDS[behaviour]
                vectors = contrast_vectors(self.model, self.tokenizer, batch["prompt"], batch["answer"], reward, ["resid_post"], [layer], sampling)
            elif row in ("reflection", "seal"):
                vectors = reflection_vectors(self.model, self.tokenizer, batch["prompt"], ["resid_post"], [layer], sampling)
            elif row == "learned":
                vectors = self.learn(data, sampling, behaviour)
            else:
                path = SAES[self.settings["testbed"]]
                if path is None:
                    return "not applicable: no SAE ships for this model"
                scores = next(iter(self.attribute("ipg", behaviour, seed, sae=path).scores.values()))
                vectors = sae_direction_vectors(self.model, load_sae(path), [int(scores.argmax())])  # unit norm
        except NoContrastError as error:
            return f"not applicable: {error}"
        (name,) = vectors.sites
        direction = vectors.vector(name).detach()
        norm = float(direction.norm())
        if norm == 0:  # e.g. a learned vector whose every step had zero advantages
            return f"not applicable: the {row} vector is zero"
        scale = self.base()["norms"][name]
        knobs = [{"strength": s, "alpha": s * scale} for s in self.settings["strengths"]]
        if row == "learned":  # also at its trained norm, both signs: on a wide model that norm can lie far below the swept strengths
            knobs += [{"strength": sign * norm / scale, "alpha": sign * norm, "as_trained": True} for sign in (-1, 1)]
        direction = (direction / norm).tolist()
        positions = "generated" if row == "seal" else "all"
        return [Setting(knob, None, {name: direction}, positions) for knob in knobs]

    def learn(self, data: ReasoningDataModule, sampling: SamplingConfig, behaviour: str) -> SteeringVectors:
        """A vector at the behaviour's block trained by policy gradient on its reward, over ``--learn-epochs`` passes of the support problems."""
        data.examples["train"] = data.examples.pop("val")
        data.batch_size = 8
        steering = GateSteering.for_model(
            self.model,
            self.tokenizer,
            selection=None,
            vectors=VectorTraining(layers=[self.layer(behaviour)]),
            reward=REWARDS[behaviour],
            sampling=sampling,
            learning_rate=self.settings["learn_rate"],
        )
        trainer = L.Trainer(
            max_epochs=self.settings["learn_epochs"],
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(steering, datamodule=data)
        self.model.eval()
        return steering.vectors

    def intervention(self, setting: Setting) -> tuple[Any, SteeringVectors | None]:
        """The gates or vectors of ``setting``, ready to attach."""
        if setting.vectors is None:
            return gates_for_components(self.model, setting.components, setting.knobs["gamma"]), None
        layers = [int(name.split(".")[1]) for name in setting.vectors]
        vectors = SteeringVectors.for_model(self.model, ["resid_post"], layers, positions=setting.positions)
        for name, direction in setting.vectors.items():
            vectors.set_vector(name, torch.tensor(direction))
        vectors.alpha = setting.knobs["alpha"]
        return None, vectors

    def measure(self, behaviour: str, row: str, seed: int) -> dict[str, Any]:
        """One cell: build the row, measure every setting on the selection problems, keep one, measure it on the test problems."""
        started = time.perf_counter()
        built = self.build(behaviour, row, seed)
        if isinstance(built, str):
            return {"not_applicable": built}
        cell: dict[str, Any] = {"build_seconds": round(time.perf_counter() - started, 2)}
        base = self.base()
        swept = [{**setting.knobs, **self.evaluate(behaviour, "select", *self.intervention(setting))} for setting in built]
        kept = choose(swept, base[behaviour]["select"], behaviour, self.settings["tolerance"])
        cell["select"] = swept
        if kept is None:
            cell["kept"], cell["test"] = None, dict(base[behaviour]["test"])
        else:
            cell["kept"] = swept[kept]
            cell["test"] = self.evaluate(behaviour, "test", *self.intervention(built[kept]))
        if built[0].vectors is None:
            cell["components"] = max((setting.components for setting in built), key=len)  # the ranking
        else:
            cell["vectors"], cell["positions"] = built[0].vectors, built[0].positions  # the unit direction at its site, where it is added
        if built[0].positions == "generated" and self.settings["engine"] != "hf":
            cell["engine"] = "hf"  # its evaluations sampled on HF (vLLM adds vectors at every position only); the base's did not
        cell["seconds"] = round(time.perf_counter() - started, 2)
        return cell

    def run(self, out: Path) -> None:
        """Measure the base and every missing cell, saving after each one."""
        summary, settings = self.summary, self.settings
        started, earlier = time.perf_counter(), summary["wall_time_s"]
        base = self.base()
        atomic_write_json(out / "results.json", summary)
        for behaviour in BEHAVIOURS:
            print(f"base ({behaviour}): select {base[behaviour]['select']}, test {base[behaviour]['test']}  ({time.perf_counter() - started:.0f} s)")
        for seed in range(settings["seeds"]):
            for behaviour in settings["behaviours"]:
                for row in settings["rows"]:
                    key = f"{behaviour}|{row}|{seed}"
                    if key in summary["cells"]:
                        continue
                    summary["cells"][key] = self.measure(behaviour, row, seed)
                    summary["wall_time_s"] = round(earlier + time.perf_counter() - started)
                    atomic_write_json(out / "results.json", summary)
                    line = _cell_line(summary["cells"][key], base[behaviour]["test"])
                    print(f"{key:<28} {line}  ({time.perf_counter() - started:.0f} s)", flush=True)


class Setting(NamedTuple):
    """One point of a row's sweep: its knobs, and the gated components or the vectors (site name -> unit direction)."""

    knobs: dict[str, float]
    components: list[str] | None
    vectors: dict[str, list[float]] | None
    positions: str = "all"


def choose(swept: list[dict[str, float]], base: dict[str, float], behaviour: str, tolerance: float) -> int | None:
    """Which setting a row keeps, chosen on the selection problems (None: none qualifies, the row keeps the base).

    Length: the shortest mean reasoning whose accuracy is within ``tolerance`` of the base's, if it is
    shorter than the base. Accuracy: the most accurate, if above the base; ties go to the weaker
    intervention (gamma nearest 1, or the smaller strength).
    """

    def weakness(row: dict[str, float]) -> float:
        return abs(row["gamma"] - 1) * row["k"] if "gamma" in row else abs(row["strength"])

    if behaviour == "length":
        allowed = [i for i, row in enumerate(swept) if row["accuracy"] >= base["accuracy"] - tolerance and row["length"] < base["length"]]
        return min(allowed, key=lambda i: (swept[i]["length"], weakness(swept[i])), default=None)
    better = [i for i, row in enumerate(swept) if row["accuracy"] > base["accuracy"]]
    return min(better, key=lambda i: (-swept[i]["accuracy"], weakness(swept[i])), default=None)


def _cell_line(cell: dict[str, Any], base: dict[str, float]) -> str:
    if "not_applicable" in cell:
        return cell["not_applicable"][:80]
    test = cell["test"]
    kept = {k: v for k, v in (cell["kept"] or {}).items() if k in ("k", "gamma", "strength", "as_trained")}
    return (
        f"kept {kept or 'base'}: accuracy {test['accuracy'] - base['accuracy']:+.3f}, "
        f"length {test['length'] - base['length']:+.1f}; build {cell['build_seconds']:.0f} s"
    )


def collect(summary: dict[str, Any], behaviour: str) -> dict[str, dict[str, Any]]:
    """Per row: the test changes against the base (mean and interval over seeds) and the build time."""
    settings, base = summary["settings"], summary["base"][behaviour]["test"]
    table = {}
    for row in settings["rows"]:
        cells = [summary["cells"][key] for seed in range(settings["seeds"]) if (key := f"{behaviour}|{row}|{seed}") in summary["cells"]]
        measured = [cell for cell in cells if "not_applicable" not in cell]
        if not measured:
            table[row] = {"not_applicable": cells[0]["not_applicable"]} if cells else {}
            continue
        table[row] = {
            "seeds": len(measured),
            "accuracy": interval([cell["test"]["accuracy"] - base["accuracy"] for cell in measured]),
            "length": interval([cell["test"]["length"] - base["length"] for cell in measured]),
            "build_seconds": statistics.fmean(cell["build_seconds"] for cell in measured),
            "kept_base": sum(cell["kept"] is None for cell in measured),
        }
    return table


def _with_interval(mean: float, half_width: float, digits: int) -> str:
    """``mean +- half_width`` with a sign, or the mean alone where one seed leaves no interval."""
    return f"{mean:+.{digits}f}" if math.isnan(half_width) else f"{mean:+.{digits}f} +- {half_width:.{digits}f}"


def print_tables(summary: dict[str, Any]) -> None:
    """Markdown tables of the test changes per behaviour."""
    settings = summary["settings"]
    print(
        f"\n{TESTBEDS[settings['testbed']].description}: {settings['test']} test and {settings['select']} selection problems, "
        f"support {settings['support']} x N={settings['num_samples']}; mean +- 95 % interval over seeds"
    )
    for behaviour in settings["behaviours"]:
        base = summary["base"][behaviour]["test"]
        decoding = "greedy" if behaviour == "accuracy" else "4 samples per problem at temperature 0.7"
        surrogate = resolve_surrogate(settings["surrogate"], "ipg", "fixed", "rloo", REWARDS[behaviour])
        print(
            f"\n{behaviour} ({decoding}; base accuracy {base['accuracy']:.3f}, length {base['length']:.1f}; ranked with the {surrogate} surrogate): "
            "change on the test problems with the setting kept on the selection problems\n"
        )
        print("| row | seeds | accuracy change | length change (tokens) | kept the base | build (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row, entry in collect(summary, behaviour).items():
            if not entry or "not_applicable" in entry:
                print(f"| {row} | - | {entry.get('not_applicable', 'not measured')[:60]} | | | |")
                continue
            accuracy, length = (_with_interval(*entry[key], digits) for key, digits in (("accuracy", 3), ("length", 1)))
            print(f"| {row} | {entry['seeds']} | {accuracy} | {length} | {entry['kept_base']} | {entry['build_seconds']:.0f} |")


def resume_or_start(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """The results so far when ``OUT/results.json`` was measured with the same settings, else a new run."""
    path = out / "results.json"
    if path.exists():
        summary = json.loads(path.read_text())
        summary["settings"].setdefault("surrogate", "sum")  # runs recorded before the option used the summed surrogate
        measured = {k: v for k, v in summary["settings"].items() if k not in NOT_MEASUREMENT}
        asked = {k: v for k, v in settings.items() if k not in NOT_MEASUREMENT}
        if summary.get("format") != FORMAT or measured != asked:
            sys.exit(f"{path} was measured with other settings; choose another --out")
        summary["settings"] = settings
        return summary
    return {"format": FORMAT, "settings": settings, "cells": {}, "wall_time_s": 0}


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default="sft", choices=sorted(TESTBEDS))
    parser.add_argument("--behaviours", nargs="+", default=list(BEHAVIOURS), choices=BEHAVIOURS)
    parser.add_argument("--rows", nargs="+", default=[*GATE_ROWS, *VECTOR_ROWS], choices=[*GATE_ROWS, *VECTOR_ROWS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--support", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4, help="trajectories per support problem (N)")
    parser.add_argument("--select", type=int, default=64, help="selection problems the kept setting is chosen on")
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 2.0])
    strengths = [-0.25, -0.1, -0.05, 0.05, 0.1, 0.25]
    parser.add_argument("--strengths", type=float, nargs="+", default=strengths, help="signed vector norms, in units of |h|")
    parser.add_argument("--learn-epochs", type=int, default=4, help="passes over the support problems that train the learned vector")
    parser.add_argument("--learn-rate", type=float, default=0.05, help="Adam learning rate of the learned vector")
    parser.add_argument(
        "--surrogate",
        default="sum",
        choices=get_args(SurrogateChoice),
        help="surrogate of the attributions (gates, SAE feature): sum (the paper's, as the recorded runs), auto (library default)",
    )
    parser.add_argument("--tolerance", type=float, default=0.02, help="accuracy a length setting may lose on the selection problems")
    parser.add_argument("--engine", default="hf", choices=get_args(Engine), help="what samples (docs/engines.md)")
    parser.add_argument("--out", help="output directory (default: benchmarks/gates_vs_vectors_<testbed>)")
    parser.add_argument("--from-results", action="store_true", help="print the tables from OUT/results.json")
    return parser.parse_args()


def main() -> None:
    """Run (or resume) the comparison and print its tables."""
    args = parse_args()
    settings = dict(vars(args))
    out = Path(args.out or Path(__file__).parent / f"gates_vs_vectors_{args.testbed}")
    if args.from_results and not (out / "results.json").exists():
        sys.exit(f"No {out / 'results.json'} to print: run the benchmark first")
    out.mkdir(parents=True, exist_ok=True)
    summary = resume_or_start(settings, out)
    if not args.from_results:
        warnings.filterwarnings("ignore", message=".*generation flags.*")
        warnings.filterwarnings("ignore", message=".*carried no signal.*")  # the estimator is pinned here by design
        Comparison(settings, summary).run(out)
    print_tables(summary)


if __name__ == "__main__":
    main()
