"""The main job: attribute, steer, learn, evaluate and export, on the shipped tiny reasoner.

1. IPG attribution of two rewards, accuracy and reasoning length, over the MLP neurons of one block
   (the last, by default), on support problems the model never saw in training;
2. fixed steering of the top-k components of each: suppressed (gate 0) and amplified (gate > 1);
3. learned gates on the top length components, a few policy-gradient steps on "be right, think
   shorter" (accuracy minus a per-token cost);
4. evaluation of every condition on held-out test problems, sampled with the same per-problem seeds
   in every condition so that differences come from the gates, not from the draw;
5. export of the learned gates as a plain Hugging Face checkpoint, checked to generate the same.
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

from ipg_lightning.attribution import IPGAttribution, run_attribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.export import export_steered_model
from ipg_lightning.gates import parse_component_name
from ipg_lightning.learned import GateSteering
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir
from ipg_lightning.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.trajectories import SamplingConfig
from ipg_lightning.validation import check_at_least, check_gamma


@dataclass(frozen=True)
class DemoPreset:
    """What ``ipg demo`` studies: a model, the problems it is asked, and its generation budget."""

    model: str
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


def learned_gate_values(steering: GateSteering, components: list[str]) -> dict[str, float]:
    """The trained gate value of each component name."""
    values = {}
    for name in components:
        site_name, index = parse_component_name(name)
        gate = steering.gates.gate(site_name)
        values[name] = round(float((gate if index is None else gate[index]).detach()), 4)
    return values


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False, **kwargs)


@quiet_lightning()
def demo(
    preset: str = "tiny-reasoner",
    model: str | None = None,
    out_dir: Path = Path("outputs/demo"),
    family: str = "mlp_neuron",
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
        model: another model on the preset's problems: a local HF directory or ``tiny:<family>``.
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
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"Unknown demo preset {preset!r}; choose from {sorted(PRESETS)}")
    counts = {
        "k": k,
        "support_prompts": support_prompts,
        "test_prompts": test_prompts,
        "num_samples": num_samples,
        "eval_samples": eval_samples,
        "steps": steps,
        "learning_steps": learning_steps,
    }
    check_at_least(1, **counts)
    check_gamma(gamma_suppress, "gamma_suppress")
    check_gamma(gamma_amplify, "gamma_amplify")
    check_output_dir(out_dir, overwrite)
    setting = PRESETS[preset]
    model = model or setting.model
    max_new_tokens = max_new_tokens or setting.max_new_tokens
    if model == TINY_REASONER_PATH and not Path(model).is_dir():
        raise FileNotFoundError(
            f"The shipped tiny reasoner is not at {model}: run the demo from a clone of the repository "
            "(pip install -e .), or train it with `ipg train-reasoner --config recipes/train_tiny_reasoner.yaml`."
        )
    lm, tokenizer = load_model_and_tokenizer(model)
    layer = lm.config.num_hidden_layers - 1 if layer is None else layer
    data = ReasoningDataModule(**setting.data, num_test=test_prompts, num_val=support_prompts, num_train=support_prompts, batch_size=8, seed=seed)
    data.connect(tokenizer)
    test_batches = list(data.test_dataloader())
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=64)
    sampled = SamplingConfig(
        num_samples=eval_samples if temperature > 0 else 1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, batch_size=64
    )
    attribution_settings = {
        "families": [family],
        "layers": [layer],
        "steps": steps,
        "rule": rule,
        "num_samples": num_samples,
        "temperature": temperature or 1.0,
        "top_p": 1.0,
        "max_new_tokens": max_new_tokens,
        "generation_batch_size": 64,
        "chunk_size": 32,
        "seed": seed,
    }

    stage(
        1,
        f"IPG attribution of accuracy and of reasoning length over {family} sites of block {layer} "
        f"({support_prompts} support problems x {num_samples} samples, q={steps} {rule})",
    )
    reports = {}
    for target, reward in (("accuracy", "accuracy"), ("length", "reasoning_length")):
        module = IPGAttribution.for_model(lm, tokenizer, reward=reward, **attribution_settings)
        reports[target] = run_attribution(module, data)
    completeness = {target: report.metadata["completeness"] for target, report in reports.items()}

    rows: dict[str, dict[str, float]] = {}
    records: dict[str, list] = {}

    def measure(name: str, gates=None, evaluated_model=None) -> None:
        result = evaluate_generations(evaluated_model or lm, tokenizer, test_batches, sampled, gates, progress=True, description=name)
        rows[name], records[name] = result.metrics, result.records

    stage(
        2,
        f"fixed steering of the top {k} components of each: gate {gamma_suppress} and {gamma_amplify}, evaluated on {test_prompts} held-out problems",
    )
    measure("base")
    selected = {target: report.select(k=k) for target, report in reports.items()}
    for target in ("accuracy", "length"):
        for label, gamma in (("suppressed", gamma_suppress), ("amplified", gamma_amplify)):
            measure(f"{target} {label}", gates_for_components(lm, selected[target], gamma))

    stage(
        3,
        f"learning the gates of the top {k} length components ({learning_steps} policy-gradient steps on "
        f"accuracy - {LENGTH_COST} x length), then evaluating them",
    )
    learned = GateSteering.for_model(
        copy.deepcopy(lm),
        tokenizer,
        ComponentSelection(components=tuple(selected["length"])),
        reward={"accuracy": 1.0, "reasoning_length": -LENGTH_COST},
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        generation_batch_size=64,
        temperature=temperature or 1.0,
        learning_rate=0.1,
        gate_penalty=0.01,
        seed=seed,
    )
    _trainer(max_steps=learning_steps, limit_val_batches=0, enable_progress_bar=True).fit(learned, datamodule=data)
    measure("length learned", learned.gates, learned.lm)

    # The reference for the export check, taken now: exporting folds the gates into learned.lm in place.
    gated = evaluate_generations(learned.lm, tokenizer, test_batches, greedy, learned.gates, description="gated (greedy)")
    stage(4, f"writing reports and exporting the learned gates as a plain Hugging Face checkpoint to {out_dir}/")
    with atomic_directory(out_dir, overwrite=overwrite, kind="ipg demo output") as staging:
        for target, report in reports.items():
            report.save(staging / f"attribution_{target}")
        exported = export_steered_model(
            learned.lm,
            tokenizer,
            learned.gates,
            staging / "exported_learned",
            source={"kind": "learned", "components": selected["length"], "reward": f"accuracy - {LENGTH_COST} x reasoning length"},
            metrics=rows["length learned"],
        )
        stage(5, "checking that the exported checkpoint, loaded fresh, generates what the gated model did")
        folded = evaluate_generations(
            load_model_and_tokenizer(str(staging / "exported_learned"))[0], tokenizer, test_batches, greedy, description="exported (greedy)"
        )
        export_matches = [r["completion"] for r in folded.records] == [r["completion"] for r in gated.records]
        summary = {
            "preset": preset,
            "model": model,
            "site": next(iter(reports["accuracy"].sites)),
            "k": k,
            "gammas": {"suppressed": gamma_suppress, "amplified": gamma_amplify},
            "evaluation": {"temperature": temperature, "completions_per_problem": sampled.num_samples, "problems": test_prompts},
            "learned_gates": learned_gate_values(learned, selected["length"]),
            "selected": selected,
            "conditions": rows,
            "completeness": completeness,
            "export": {"folded_sites": exported["folded_sites"], "greedy_generations_identical": export_matches},
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(staging / "summary.json", summary)
        atomic_write_text(staging / "summary.md", format_table(rows) + "\n")
        atomic_write_text(staging / "generations.jsonl", "".join(json.dumps({"condition": c, **r}) + "\n" for c, rs in records.items() for r in rs))

    how = (
        f"sampled at temperature {temperature}, {sampled.num_samples} per problem, same seeds in every condition"
        if temperature > 0
        else "greedy decoding"
    )
    print(
        f"\n{preset if model == setting.model else model}: top {k} {family} components of block {layer} by IPG; {test_prompts} held-out problems, {how}\n"
    )
    print(format_table(rows))
    for target, block in completeness.items():
        print(
            f"completeness ({target}, q={steps} {rule}): sum of scores {block['sum_of_scores']:.4g} vs L(1) - L(0) "
            f"{block['surrogate_delta']:.4g}, residual {block['residual']:.2g}"
        )
    print("learned gates: " + ", ".join(f"{name} {value:.2f}" for name, value in summary["learned_gates"].items()))
    print(f"exported learned gates (folded {exported['folded_sites']}): greedy generations identical = {export_matches}")
    print(f"wall time {summary['wall_time_s']} s; reports, plots, metrics and the exported model are in {out_dir}/")
    return summary
