"""The main job: attribute, steer, learn, evaluate and export, on the shipped tiny reasoner.

1. IPG attribution of two rewards, accuracy and reasoning length, over the MLP neurons of one block
   (the last, by default), on support problems the model never saw in training;
2. fixed steering of the top-k components of each: suppressed (gate 0) and amplified (gate > 1);
3. learned gates on the top length components, a few policy-gradient steps on "be right, think
   shorter" (accuracy minus a per-token cost);
4. evaluation of every condition on held-out test problems, sampled with the same per-problem seeds
   in every condition so that differences come from the gates, not from the draw;
5. export of the learned gates as a plain Hugging Face checkpoint, checked to generate the same.

Each stage is a function over a :class:`DemoRun`; :func:`demo` is the typed command that runs them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution import AttributionReport, IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningBatch, ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.gates import ComponentGates
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir
from ipg_lightning.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK
from ipg_lightning.sites import SiteFamilyName
from ipg_lightning.steering import ComponentSelection, GateSteering, export_steered_model, gates_for_components
from ipg_lightning.trajectories import SamplingConfig
from ipg_lightning.validation import check_at_least, check_gamma


@dataclass(frozen=True)
class DemoPreset:
    """What ``ipg demo`` studies: a model, the problems it is asked, and its generation budget."""

    model_path: str
    data: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 160


#: ``tiny-reasoner``: the shipped reasoner on the task it was trained for (held-out problems);
#: ``smollm2``: SmolLM2-135M-Instruct (``ipg prepare-smollm2`` first) on reasoning-gym arithmetic.
PRESETS = {
    "tiny-reasoner": DemoPreset(TINY_REASONER_PATH, {"synthetic_task": TINY_REASONER_TASK}),
    "smollm2": DemoPreset(
        "smollm2",
        {"source": "reasoning_gym:basic_arithmetic", "task_kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}},
        max_new_tokens=48,
    ),
}
#: Per-token cost of the learned gates' reward: one "Wait, let me check" step (~15 tokens) costs
#: about a third of a correct answer.
LENGTH_COST = 0.02


@dataclass
class DemoRun:
    """What every stage of the demo reads, and the conditions measured so far.

    Args:
        lm: the model under study.
        tokenizer: its tokenizer.
        data: support (validation) and held-out (test) problems.
        settings: the demo's arguments (``family``, ``layer``, ``k``, ``num_samples``, ...).
        sampled: how every condition is evaluated.
        greedy: greedy decoding, for the export check.
        support_sampling: how support problems are sampled, for attribution and gate learning.
    """

    lm: nn.Module
    tokenizer: PreTrainedTokenizerBase
    data: ReasoningDataModule
    settings: dict[str, Any]
    sampled: SamplingConfig
    greedy: SamplingConfig
    support_sampling: SamplingConfig
    test_batches: list[ReasoningBatch] = field(default_factory=list)
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def measure(self, name: str, gates: ComponentGates | None = None, model: nn.Module | None = None) -> None:
        """Evaluate one condition on the held-out problems and keep its metrics and generations."""
        result = evaluate_generations(model or self.lm, self.tokenizer, self.test_batches, self.sampled, gates, progress=True, description=name)
        self.rows[name], self.records[name] = result.metrics, result.records


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of the headline metrics, one row per condition."""
    header = f"{'condition':<22}{'accuracy':>10}{'answer rate':>13}{'mean length':>13}{'reflection':>12}"
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        lines.append(f"{name:<22}{m['accuracy']:>10.3f}{m['answer_rate']:>13.3f}{m['reasoning_length_mean']:>13.1f}{m['reflection_rate']:>12.3f}")
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners ("GPU available", tips) and its known-harmless
    warnings (frozen modules in eval mode during fit), so the demo's progress bars and table stand out.
    Also a decorator (``@quiet_lightning()``) that keeps the function's signature for the CLI."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*treespec.*")
        try:
            yield
        finally:
            logger.setLevel(level)


def stage(number: int, text: str) -> None:
    """Announce one of the demo's five stages."""
    print(f"[{number}/5] {text}", flush=True)


def attribute_accuracy_and_length(run: DemoRun) -> dict[str, AttributionReport]:
    """Stage 1: IPG reports of the accuracy reward and of the reasoning-length reward."""
    s = run.settings
    stage(
        1,
        f"IPG attribution of accuracy and of reasoning length over {s['family']} sites of block {s['layer']} "
        f"({s['support_prompts']} support problems x {s['num_samples']} samples, q={s['steps']} {s['rule']})",
    )
    settings = {
        "families": [s["family"]],
        "layers": [s["layer"]],
        "steps": s["steps"],
        "rule": s["rule"],
        "sampling": run.support_sampling,
        "chunk_size": 32,
    }
    return {
        target: run_attribution(IPGAttribution.for_model(run.lm, run.tokenizer, reward=reward, **settings), run.data)
        for target, reward in (("accuracy", "accuracy"), ("length", "reasoning_length"))
    }


def steer_top_components(run: DemoRun, reports: dict[str, AttributionReport]) -> dict[str, list[str]]:
    """Stage 2: the base model, then the top-k components of each report suppressed and amplified."""
    s = run.settings
    stage(
        2,
        f"fixed steering of the top {s['k']} components of each: gate {s['gamma_suppress']} and {s['gamma_amplify']}, "
        f"evaluated on {s['test_prompts']} held-out problems",
    )
    run.measure("base")
    selected = {target: report.select(k=s["k"]) for target, report in reports.items()}
    for target in ("accuracy", "length"):
        for label, gamma in (("suppressed", s["gamma_suppress"]), ("amplified", s["gamma_amplify"])):
            run.measure(f"{target} {label}", gates_for_components(run.lm, selected[target], gamma))
    return selected


def learn_length_gates(run: DemoRun, components: list[str]) -> GateSteering:
    """Stage 3: a few policy-gradient steps on the gates of the top length components, then their evaluation."""
    s = run.settings
    stage(
        3,
        f"learning the gates of the top {s['k']} length components ({s['learning_steps']} policy-gradient steps on "
        f"accuracy - {LENGTH_COST} x length), then evaluating them",
    )
    learned = GateSteering.for_model(
        copy.deepcopy(run.lm),
        run.tokenizer,
        selection=ComponentSelection(components=tuple(components)),
        reward={"accuracy": 1.0, "reasoning_length": -LENGTH_COST},
        sampling=run.support_sampling,
        learning_rate=0.1,
        gate_penalty=0.01,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        max_steps=s["learning_steps"],
        limit_val_batches=0,
        enable_progress_bar=True,
    )
    trainer.fit(learned, datamodule=run.data)
    run.measure("length learned", learned.gates, learned.lm)
    return learned


def export_and_check(run: DemoRun, learned: GateSteering, components: list[str], directory: Path) -> dict[str, Any]:
    """Stages 4-5: export the learned gates and check that the export, loaded fresh, generates what the gated model did."""
    # The reference, taken first: exporting folds the gates into learned.lm in place.
    gated = evaluate_generations(learned.lm, run.tokenizer, run.test_batches, run.greedy, learned.gates, description="gated (greedy)")
    source = {"kind": "learned", "components": components, "reward": f"accuracy - {LENGTH_COST} x reasoning length"}
    card = export_steered_model(learned.lm, run.tokenizer, learned.gates, directory, source=source, metrics=run.rows["length learned"])
    stage(5, "checking that the exported checkpoint, loaded fresh, generates what the gated model did")
    exported = load_model_and_tokenizer(str(directory))[0]
    folded = evaluate_generations(exported, run.tokenizer, run.test_batches, run.greedy, description="exported (greedy)")
    identical = [r["completion"] for r in folded.records] == [r["completion"] for r in gated.records]
    return {"folded_sites": card["folded_sites"], "greedy_generations_identical": identical}


def write_outputs(
    run: DemoRun, out_dir: Path, overwrite: bool, reports: dict[str, AttributionReport], learned: GateSteering, selected: dict[str, list[str]]
) -> dict[str, Any]:
    """Stage 4 (and 5): reports, the export and its check, the summary and generations, written atomically."""
    s = run.settings
    stage(4, f"writing reports and exporting the learned gates as a plain Hugging Face checkpoint to {out_dir}/")
    with atomic_directory(out_dir, overwrite=overwrite, kind="ipg demo output") as staging:
        for target, report in reports.items():
            report.save(staging / f"attribution_{target}")
        export = export_and_check(run, learned, selected["length"], staging / "exported_learned")
        summary = {
            "preset": s["preset"],
            "model": s["model_path"],
            "site": next(iter(reports["accuracy"].sites)),
            "k": s["k"],
            "gammas": {"suppressed": s["gamma_suppress"], "amplified": s["gamma_amplify"]},
            "evaluation": {"temperature": s["temperature"], "completions_per_problem": run.sampled.num_samples, "problems": s["test_prompts"]},
            "learned_gates": {name: round(value, 4) for name, value in learned.gate_values().items()},
            "selected": selected,
            "conditions": run.rows,
            "completeness": {target: report.metadata["completeness"] for target, report in reports.items()},
            "export": export,
            "wall_time_s": round(time.perf_counter() - s["started"], 1),
        }
        atomic_write_json(staging / "summary.json", summary)
        atomic_write_text(staging / "summary.md", format_table(run.rows) + "\n")
        lines = [json.dumps({"condition": condition, **record}) + "\n" for condition, records in run.records.items() for record in records]
        atomic_write_text(staging / "generations.jsonl", "".join(lines))
    return summary


def print_summary(run: DemoRun, summary: dict[str, Any], title: str, out_dir: Path) -> None:
    """The table and the checks a user reads at the end."""
    s = run.settings
    how = (
        f"sampled at temperature {s['temperature']}, {run.sampled.num_samples} per problem, same seeds in every condition"
        if s["temperature"] > 0
        else "greedy decoding"
    )
    print(f"\n{title}: top {s['k']} {s['family']} components of block {s['layer']} by IPG; {s['test_prompts']} held-out problems, {how}\n")
    print(format_table(run.rows))
    for target, block in summary["completeness"].items():
        print(
            f"completeness ({target}, q={s['steps']} {s['rule']}): sum of scores {block['sum_of_scores']:.4g} vs L(1) - L(0) "
            f"{block['surrogate_delta']:.4g}, residual {block['residual']:.2g}"
        )
    print("learned gates: " + ", ".join(f"{name} {value:.2f}" for name, value in summary["learned_gates"].items()))
    export = summary["export"]
    print(f"exported learned gates (folded {export['folded_sites']}): greedy generations identical = {export['greedy_generations_identical']}")
    print(f"wall time {summary['wall_time_s']} s; reports, plots, metrics and the exported model are in {out_dir}/")


def prepare_run(settings: dict[str, Any]) -> DemoRun:
    """Load the model and the problems, and fix how conditions are evaluated."""
    model_path = settings["model_path"]
    if model_path == TINY_REASONER_PATH and not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"The shipped tiny reasoner is not at {model_path}: run the demo from a clone of the repository "
            "(pip install -e .), or train it with `ipg train-reasoner --config recipes/train_tiny_reasoner.yaml`."
        )
    lm, tokenizer = load_model_and_tokenizer(model_path)
    if settings["layer"] is None:
        settings["layer"] = lm.config.num_hidden_layers - 1
    data = ReasoningDataModule(
        **PRESETS[settings["preset"]].data,
        num_test=settings["test_prompts"],
        num_val=settings["support_prompts"],
        num_train=settings["support_prompts"],
        batch_size=8,
        seed=settings["seed"],
    )
    data.connect(tokenizer)
    temperature, max_new_tokens = settings["temperature"], settings["max_new_tokens"]
    greedy = SamplingConfig.greedy(max_new_tokens, batch_size=64)
    sampled = SamplingConfig(
        num_samples=settings["eval_samples"] if temperature > 0 else 1,
        temperature=temperature,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=64,
    )
    support = SamplingConfig(
        num_samples=settings["num_samples"],
        temperature=temperature or 1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=64,
        seed=settings["seed"],
    )
    return DemoRun(lm, tokenizer, data, settings, sampled, greedy, support, test_batches=list(data.test_dataloader()))


@quiet_lightning()
def demo(
    preset: str = "tiny-reasoner",
    model_path: str | None = None,
    out_dir: Path = Path("outputs/demo"),
    family: SiteFamilyName = "mlp_neuron",
    layer: int | None = None,
    k: int = 4,
    gamma_suppress: float = 0.0,
    gamma_amplify: float = 2.0,
    support_prompts: int = 32,
    test_prompts: int = 64,
    num_samples: int = 4,
    eval_samples: int = 4,
    temperature: float = 0.7,
    steps: int = 16,
    rule: str = "gauss_legendre",
    learning_steps: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Attribute accuracy and reasoning length with IPG, steer (fixed and learned), evaluate, export.

    Args:
        preset: ``tiny-reasoner`` (the shipped model, a minute or two on 2 CPU cores) or ``smollm2``
            (SmolLM2-135M-Instruct on reasoning-gym arithmetic; run ``ipg prepare-smollm2`` once).
        model_path: another model on the preset's problems: a local HF directory or ``tiny:<family>``.
        out_dir: where reports, metrics, generations, the exported model and the table go (atomically).
        family: site family to attribute and steer.
        layer: block to attribute (default: the last one).
        k: number of top components steered.
        gamma_suppress: gate value of the suppressed conditions.
        gamma_amplify: gate value of the amplified conditions.
        support_prompts: problems used for attribution and gate learning (never the test problems).
        test_prompts: held-out problems every condition is evaluated on.
        num_samples: trajectories per support problem (N).
        eval_samples: completions per test problem (1 when ``temperature`` is 0).
        temperature: sampling temperature of attribution, learning and evaluation (0: greedy
            evaluation). Reflection ("Wait, let me check") is a minority choice, so greedy decoding
            hides most of the reasoning-length behaviour that steering moves.
        steps: IPG quadrature points (q).
        rule: IPG quadrature rule (``right`` is the paper's; Gauss-Legendre closes the
            completeness gap with fewer points on these smooth paths).
        learning_steps: policy-gradient steps of the learned gates.
        max_new_tokens: generation cap (default: the preset's).
        seed: sampling seed.
        overwrite: replace an earlier output of this library at ``out_dir`` (never other files).
    """
    started = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"Unknown demo preset {preset!r}; choose from {sorted(PRESETS)}")
    check_at_least(
        1,
        k=k,
        support_prompts=support_prompts,
        test_prompts=test_prompts,
        num_samples=num_samples,
        eval_samples=eval_samples,
        steps=steps,
        learning_steps=learning_steps,
    )
    check_gamma(gamma_suppress, "gamma_suppress")
    check_gamma(gamma_amplify, "gamma_amplify")
    check_output_dir(out_dir, overwrite)
    settings = {
        **locals(),
        "model_path": model_path or PRESETS[preset].model_path,
        "max_new_tokens": max_new_tokens or PRESETS[preset].max_new_tokens,
    }
    run = prepare_run(settings)
    reports = attribute_accuracy_and_length(run)
    selected = steer_top_components(run, reports)
    learned = learn_length_gates(run, selected["length"])
    summary = write_outputs(run, out_dir, overwrite, reports, learned, selected)
    print_summary(run, summary, preset if settings["model_path"] == PRESETS[preset].model_path else settings["model_path"], out_dir)
    return summary
