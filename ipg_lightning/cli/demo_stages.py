"""The stages of ``ipg demo`` (:mod:`ipg_lightning.cli.demo`), each a function over a :class:`DemoRun`.

The command checks its arguments and imports this module only then: torch, Lightning and
transformers load after a bad argument has been refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution import AttributionReport, IPGAttribution, run_attribution
from ipg_lightning.attribution.plots import plot_report
from ipg_lightning.data import ReasoningBatch, ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.evaluation.protocols import protocol_record
from ipg_lightning.explorer import Effects, MeasuredEffect, page_for_report
from ipg_lightning.gates.component_gates import ComponentGates, parse_component_name
from ipg_lightning.model.families import sae_point
from ipg_lightning.model.identity import same_model_name
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, strict_json
from ipg_lightning.rollout.sampling import sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.sae import load_sae
from ipg_lightning.steering import ComponentSelection, GateSteering, export_steered_model, gates_for_components
from ipg_lightning.steering.loading import SteeringDescription
from ipg_lightning.steering.vector_sources import NoContrastError, reflection_vectors
from ipg_lightning.vectors import SteeringVectors, save_vectors
from ipg_lightning.zoo.reasoner import TINY_REASONER_SAE_PATH, TINY_REASONER_TASK


@dataclass(frozen=True)
class DemoPreset:
    """What ``ipg demo`` studies: a model, the problems it is asked, and its generation budget."""

    model_path: str
    data: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 160
    sae: str | None = None


#: ``tiny-reasoner``: the shipped reasoner on the task it was trained for (held-out problems), with its SAE;
#: ``smollm2``: SmolLM2-135M-Instruct (``ipg prepare-smollm2`` first) on reasoning-gym arithmetic.
#: The command's ``DemoPresetName`` lists the same names (a test keeps them equal).
PRESETS: dict[str, DemoPreset] = {
    "tiny-reasoner": DemoPreset("tiny-reasoner", {"synthetic_task": TINY_REASONER_TASK}, sae=TINY_REASONER_SAE_PATH),
    "smollm2": DemoPreset(
        "smollm2",
        {"source": "reasoning_gym:basic_arithmetic", "task_kwargs": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}},
        max_new_tokens=48,
    ),
}
#: Completions generated together when evaluating a condition.
EVALUATION_BATCH = 256
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
    steered: dict[str, tuple[list[str], float | None]] = field(default_factory=dict)

    def measure(
        self,
        name: str,
        gates: ComponentGates | None = None,
        model: nn.Module | None = None,
        components: list[str] | None = None,
        gamma: float | None = None,
    ) -> None:
        """Evaluate one condition on the held-out problems; keep its metrics, generations, and the
        ``components`` it steers (at ``gamma``; None for learned gates)."""
        result = evaluate_generations(model or self.lm, self.tokenizer, self.test_batches, self.sampled, gates, progress=True, description=name)
        self.rows[name], self.records[name] = result.metrics, result.records
        if components:
            self.steered[name] = (list(components), gamma)


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
        # the demo has no signal_retries option (it runs the paper's estimator); the reasoner answers most support problems right
        warnings.filterwarnings("ignore", message=".*support prompts carried no signal.*")
        try:
            yield
        finally:
            logger.setLevel(level)


def stage(number: int, text: str) -> None:
    """Announce one of the demo's six stages."""
    print(f"[{number}/6] {text}", flush=True)


def attribute_accuracy_and_length(run: DemoRun) -> dict[str, AttributionReport]:
    """Stage 1: IPG reports of the accuracy reward and of the reasoning-length reward."""
    s = run.settings
    stage(
        1,
        f"IPG attribution of accuracy and of reasoning length over {s['family']} sites of block {s['layer']} "
        f"({s['support_prompts']} support problems x {s['num_samples']} samples, q={s['steps']} {s['rule']})",
    )
    return _attribute_both(run, families=[s["family"]], layers=[s["layer"]])


def _attribute_both(run: DemoRun, **sites: Any) -> dict[str, AttributionReport]:
    """IPG reports of accuracy and of reasoning length over ``sites`` (families, layers, saes; or other settings)."""
    s = run.settings
    settings = {"steps": s["steps"], "rule": s["rule"], "sampling": run.support_sampling, "chunk_size": 32, "keep_trajectories": True, **sites}
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
            run.measure(f"{target} {label}", gates_for_components(run.lm, selected[target], gamma), components=selected[target], gamma=gamma)
    return selected


def learn_length_gates(run: DemoRun, selection: ComponentSelection, condition: str = "length learned", announce: bool = True) -> GateSteering:
    """Stage 3: a few policy-gradient steps on the gates of the top length components, then their evaluation."""
    s = run.settings
    if announce:
        stage(
            3,
            f"learning the gates of the top {s['k']} length components ({s['learning_steps']} policy-gradient steps on "
            f"accuracy - {LENGTH_COST} x length), then evaluating them",
        )
    learned = GateSteering.for_model(
        copy.deepcopy(run.lm),
        run.tokenizer,
        selection=selection,
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
        max_epochs=math.ceil(s["learning_steps"] / len(run.data.train_dataloader())),  # so the progress bar counts real epochs
        limit_val_batches=0,
        enable_progress_bar=True,
    )
    trainer.fit(learned, datamodule=run.data)
    run.measure(condition, learned.gates, learned.lm, components=learned.components)
    return learned


def steer_sae_features(run: DemoRun, sae_path: str) -> tuple[dict[str, AttributionReport], dict[str, list[str]], GateSteering]:
    """Stage 4: IPG over the SAE's features, the top features of each report suppressed, learned gates on the top length features."""
    s = run.settings
    sae = load_sae(sae_path)
    stage(
        4,
        f"the same over the {sae.d_sae} features of the SAE at {sae.hook_name} (k = {sae.k}): IPG of both rewards, "
        f"top {s['k']} features suppressed, learned gates on the top length features",
    )
    layer = sae_point(sae.hook_name).layer
    reports = _attribute_both(run, families=["sae_feature"], layers=[layer], saes=[sae_path], steps=s["sae_steps"])
    selected = {target: report.select(k=s["k"]) for target, report in reports.items()}
    for target in ("accuracy", "length"):
        gamma = s["gamma_suppress"]
        run.measure(f"{target} suppr. (SAE)", gates_for_components(run.lm, selected[target], gamma), components=selected[target], gamma=gamma)
    learned = learn_length_gates(
        run, ComponentSelection(components=tuple(selected["length"]), saes=(sae_path,)), "length learned (SAE)", announce=False
    )
    return reports, selected, learned


def export_and_check(run: DemoRun, learned: GateSteering, condition: str, directory: Path) -> dict[str, Any]:
    """Export learned gates and check that the export, loaded fresh, generates what the gated model did."""
    # The reference, taken first: exporting folds the gates into learned.lm in place.
    gated = evaluate_generations(learned.lm, run.tokenizer, run.test_batches, run.greedy, learned.gates, description="gated (greedy)")
    reward = f"accuracy - {LENGTH_COST} x reasoning length"
    source = SteeringDescription("learned", run.settings["model_path"], components=list(learned.components), reward=reward)
    card = export_steered_model(learned.lm, run.tokenizer, learned.gates, directory, source=source.to_json(), metrics=run.rows[condition])
    exported = load_model_and_tokenizer(str(directory))[0]  # re-applies what did not fold (ipg_lightning.load_steered)
    reloaded = evaluate_generations(exported, run.tokenizer, run.test_batches, run.greedy, description="exported (greedy)")
    identical = [r["completion"] for r in reloaded.records] == [r["completion"] for r in gated.records]
    return {"folded_sites": card["folded_sites"], "loader_sites": card["loader_sites"], "greedy_generations_identical": identical}


def reflection_vector(run: DemoRun) -> tuple[SteeringVectors | None, str]:
    """A SEAL-style execution-minus-reflection vector at the output of the demo's block, from the support
    problems (shown on the length report's explorer page); None, and why, where the traces hold no reflections."""
    prompts = run.data.full_batch("val")["prompt"]
    try:
        vectors = reflection_vectors(run.lm, run.tokenizer, prompts, ["resid_post"], [run.settings["layer"]], run.support_sampling)
    except NoContrastError:
        return None, "the support traces hold no reflection (or no execution) step to contrast"
    return vectors, "reflection.safetensors"


def write_outputs(
    run: DemoRun,
    out_dir: Path,
    overwrite: bool,
    reports: dict[str, AttributionReport],
    learned: GateSteering,
    selected: dict[str, list[str]],
    sae_part: tuple[dict[str, AttributionReport], dict[str, list[str]], GateSteering] | None = None,
) -> dict[str, Any]:
    """Stages 5 and 6: reports, the exports and their checks, the summary and generations, written atomically."""
    s = run.settings
    stage(5, f"writing reports, their explorer pages, and the learned gates exported as Hugging Face checkpoints to {out_dir}/")
    vector, vector_note = reflection_vector(run)
    with atomic_directory(out_dir, overwrite=overwrite, kind="ipg demo output") as staging:
        if vector is not None:
            save_vectors(vector, staging / vector_note, run.lm, s["model_path"])
        named = {f"attribution_{target}": report for target, report in reports.items()}
        named.update({f"attribution_{target}_sae": report for target, report in (sae_part[0] if sae_part else {}).items()})
        for name, report in named.items():
            report.save(staging / name, extra_files=partial(plot_report, report))
            # The SAE pages shade activations only: splitting their scores by token would replay the q = 32
            # path over every kept trajectory, most of the pages' time (`ipg explore` on the report does it).
            contributions = not name.endswith("_sae")
            effects = measured_effects(run, report)
            vectors = {"reflection": vector} if name == "attribution_length" and vector is not None else None
            page = staging / f"{name}.html"
            page_for_report(report, run.lm, run.tokenizer, page, effects, progress=True, contributions=contributions, vectors=vectors)
        stage(6, "checking that each exported checkpoint, loaded fresh, generates what the gated model did")
        export = export_and_check(run, learned, "length learned", staging / "exported_learned")
        summary = {
            "preset": s["preset"],
            "model": s["model_path"],
            "site": next(iter(reports["accuracy"].sites)),
            "k": s["k"],
            "gammas": {"suppressed": s["gamma_suppress"], "amplified": s["gamma_amplify"]},
            "evaluation": {"temperature": s["temperature"], "completions_per_problem": run.sampled.num_samples, "problems": s["test_prompts"]},
            "sampling": sampling_record(run.sampled),
            "protocol": protocol_record(None, run.sampled, run.data.template, run.tokenizer),
            "learned_gates": {name: round(value, 4) for name, value in learned.gate_values().items()},
            "selected": selected,
            "conditions": run.rows,
            "completeness": {target: asdict(report.metadata.completeness) for target, report in reports.items()},
            "export": export,
            "reflection_vector": {"file": vector_note, "norms": vector.norms()} if vector is not None else {"not_built": vector_note},
        }
        if sae_part:
            sae_reports, sae_selected, sae_learned = sae_part
            summary["sae"] = {
                "path": next(iter(sae_reports["accuracy"].metadata.saes.values())),
                "site": next(iter(sae_reports["accuracy"].sites)),
                "selected": sae_selected,
                "learned_gates": {name: round(value, 4) for name, value in sae_learned.gate_values().items()},
                "completeness": {target: asdict(report.metadata.completeness) for target, report in sae_reports.items()},
                "export": export_and_check(run, sae_learned, "length learned (SAE)", staging / "exported_learned_sae"),
            }
        summary["wall_time_s"] = round(time.perf_counter() - s["started"], 1)
        atomic_write_json(staging / "summary.json", summary)
        atomic_write_text(staging / "summary.md", format_table(run.rows) + "\n")
        lines = [strict_json({"condition": condition, **record}) + "\n" for condition, records in run.records.items() for record in records]
        atomic_write_text(staging / "generations.jsonl", "".join(lines))
    return summary


def measured_effects(run: DemoRun, report: AttributionReport) -> Effects:
    """The demo's conditions that steered components of ``report``, as its explorer page shows them."""
    conditions = [
        MeasuredEffect(name, gamma, components, run.rows[name])
        for name, (components, gamma) in run.steered.items()
        if all(parse_component_name(component)[0] in report.sites for component in components)
    ]
    return Effects(base=run.rows.get("base"), conditions=conditions)


def print_summary(run: DemoRun, summary: dict[str, Any], title: str, out_dir: Path) -> None:
    """The table and the checks a user reads at the end."""
    s = run.settings
    how = (
        f"sampled at temperature {s['temperature']}, {run.sampled.num_samples} per problem, same seeds in every condition"
        if s["temperature"] > 0
        else "greedy decoding"
    )
    features = f" and of the SAE at {summary['sae']['site'].removesuffix('.sae')}" if "sae" in summary else ""
    print(f"\n{title}: top {s['k']} {s['family']} components of block {s['layer']}{features} by IPG; {s['test_prompts']} held-out problems, {how}\n")
    print(format_table(run.rows))
    completeness = {f"{target}, {s['family']}": block for target, block in summary["completeness"].items()}
    completeness.update({f"{target}, SAE features": block for target, block in summary.get("sae", {}).get("completeness", {}).items()})
    for what, block in completeness.items():
        steps = s["sae_steps"] if what.endswith("SAE features") else s["steps"]
        print(
            f"completeness ({what}, q={steps} {s['rule']}): sum of scores {block['sum_of_scores']:.4g} vs L(1) - L(0) "
            f"{block['surrogate_delta']:.4g}, residual {block['residual']:.2g}"
        )
    print("learned gates: " + ", ".join(f"{name} {value:.2f}" for name, value in summary["learned_gates"].items()))
    exports = {"learned gates": summary["export"]}
    if "sae" in summary:
        print("learned SAE feature gates: " + ", ".join(f"{name} {value:.2f}" for name, value in summary["sae"]["learned_gates"].items()))
        exports["learned SAE feature gates"] = summary["sae"]["export"]
    for what, export in exports.items():
        kept = f", carried by the loader {export['loader_sites']}" if export["loader_sites"] else ""
        print(f"exported {what} (folded {export['folded_sites']}{kept}): greedy generations identical = {export['greedy_generations_identical']}")
    print(f"wall time {summary['wall_time_s']} s; reports, plots, metrics and the exported models are in {out_dir}/")
    print(f"to see what the top components do, open {out_dir}/attribution_length.html (and the other attribution_*.html) in a browser")
    reflection = summary["reflection_vector"]
    if "file" in reflection:
        print(f"the length page also shows a reflection vector's direction ({out_dir}/{reflection['file']}, for ipg evaluate --vectors)")
    else:
        print(f"no reflection vector: {reflection['not_built']}")
    if "sae" in summary:
        print(f"the SAE pages shade activations only; `ipg explore {out_dir}/attribution_length_sae --overwrite true` adds per-token contributions")


def prepare_run(settings: dict[str, Any]) -> DemoRun:
    """Load the model and the problems, and fix how conditions are evaluated."""
    model_path = settings["model_path"]
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
    # Every condition's completions in one or two generate calls over a preallocated cache: the same
    # tokens as smaller calls (sampling is per completion), in about 60 % of the time.
    engine = settings["engine"]
    greedy = replace(SamplingConfig.greedy(max_new_tokens, batch_size=EVALUATION_BATCH, kv_cache="static"), engine=engine)
    sampled = SamplingConfig(
        num_samples=settings["eval_samples"] if temperature > 0 else 1,
        temperature=temperature,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=EVALUATION_BATCH,
        kv_cache="static",
        engine=engine,
    )
    support = SamplingConfig(
        num_samples=settings["num_samples"],
        temperature=temperature or 1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=64,
        seed=settings["seed"],
        engine=engine,
    )
    return DemoRun(lm, tokenizer, data, settings, sampled, greedy, support, test_batches=[data.full_batch("test")])


@quiet_lightning()
def run_demo(settings: dict[str, Any]) -> dict[str, Any]:
    """Run every stage with the command's checked ``settings`` (its arguments, and ``started``)."""
    preset = PRESETS[settings["preset"]]
    settings = {
        **settings,
        "model_path": settings["model_path"] or preset.model_path,
        "max_new_tokens": settings["max_new_tokens"] or preset.max_new_tokens,
    }
    run = prepare_run(settings)
    reports = attribute_accuracy_and_length(run)
    selected = steer_top_components(run, reports)
    learned = learn_length_gates(run, ComponentSelection(components=tuple(selected["length"])))
    own_model = same_model_name(settings["model_path"], preset.model_path)  # the preset's SAE reads its own model only
    sae_path = preset.sae if settings["sae_features"] and own_model else None
    sae_part = steer_sae_features(run, sae_path) if sae_path else None
    out_dir = Path(settings["out_dir"])
    summary = write_outputs(run, out_dir, settings["overwrite"], reports, learned, selected, sae_part)
    print_summary(run, summary, settings["preset"] if own_model else settings["model_path"], out_dir)
    return summary
