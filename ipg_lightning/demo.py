"""The main job: attribute, steer, learn, evaluate and export, on the shipped tiny reasoner.

1. IPG attribution of two rewards, accuracy and reasoning length, over MLP neurons of one block,
   on support problems the model never saw in training;
2. fixed steering of the top-k components of each: suppressed (gate 0) and amplified (gate > 1);
3. learned gates on the top accuracy components, a few policy-gradient steps;
4. evaluation of every condition on held-out test problems (greedy decoding);
5. export of the learned gates as a plain Hugging Face checkpoint, checked to generate the same.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import lightning as L

from ipg_lightning.attribution import IPGAttribution
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.export import export_steered_model
from ipg_lightning.io import atomic_directory, atomic_write_json, atomic_write_text
from ipg_lightning.learned import GateSteering
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.reasoner import TINY_REASONER_PATH, TINY_REASONER_TASK
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.trajectories import SamplingConfig

COLUMNS = ("accuracy", "answer_rate", "reasoning_length_mean", "reflection_rate")


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of the headline metrics, one row per condition."""
    header = f"{'condition':<22}{'accuracy':>10}{'answer rate':>13}{'mean length':>13}{'reflection':>12}"
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        lines.append(f"{name:<22}{m['accuracy']:>10.3f}{m['answer_rate']:>13.3f}{m['reasoning_length_mean']:>13.1f}"
                     f"{m['reflection_rate']:>12.3f}")
    return "\n".join(lines)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, **kwargs)


def demo(
    model: str = "tiny:llama",
    out_dir: Path = Path("outputs/demo"),
    family: str = "mlp_neuron",
    layer: int | None = None,
    k: int = 8,
    gamma_suppress: float = 0.0,
    gamma_amplify: float = 1.5,
    support_prompts: int = 32,
    test_prompts: int = 64,
    num_samples: int = 4,
    steps: int = 5,
    learning_steps: int = 8,
    max_new_tokens: int = 160,
    seed: int = 0,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Attribute accuracy and reasoning length with IPG, steer (fixed and learned), evaluate, export.

    Args:
        model: the model to study: the shipped tiny reasoner by default, any local HF directory, or
            ``tiny:<family>`` (random weights, for a quick look at the mechanics).
        out_dir: where reports, metrics, generations, the exported model and the table go (atomically).
        family: site family to attribute and steer.
        layer: block to attribute (default: 3/4 depth).
        k: number of top components steered.
        gamma_suppress: gate value of the suppressed conditions.
        gamma_amplify: gate value of the amplified conditions.
        support_prompts: problems used for attribution (never the test problems).
        test_prompts: held-out problems every condition is evaluated on.
        num_samples: trajectories per support problem (N).
        steps: IPG quadrature points (q).
        learning_steps: policy-gradient steps of the learned gates.
        max_new_tokens: generation cap.
        seed: sampling seed.
        overwrite: replace an existing ``out_dir``.
    """
    start = time.perf_counter()
    lm, tokenizer = load_model_and_tokenizer(model)
    data = ReasoningDataModule(synthetic_task=TINY_REASONER_TASK, num_test=test_prompts, num_val=support_prompts,
                               num_train=support_prompts, batch_size=8, seed=seed)
    data.connect(tokenizer)
    test_batches = list(data.test_dataloader())
    greedy = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=64)
    layers = None if layer is None else [layer]
    attribution_settings = dict(families=[family], layers=layers, steps=steps, num_samples=num_samples, temperature=1.0,
                                top_p=1.0, max_new_tokens=max_new_tokens, generation_batch_size=64, chunk_size=32, seed=seed)

    reports, completeness = {}, {}
    for target, reward in (("accuracy", "accuracy"), ("length", "reasoning_length")):
        module = IPGAttribution.for_model(lm, tokenizer, reward=reward, **attribution_settings)
        _trainer(inference_mode=False).validate(module, datamodule=data, verbose=False)
        reports[target] = module.report
        completeness[target] = module.report.metadata["completeness"]

    rows: dict[str, dict[str, float]] = {}
    records: dict[str, list] = {}

    def measure(name: str, gates=None, evaluated_model=None) -> None:
        result = evaluate_generations(evaluated_model or lm, tokenizer, test_batches, greedy, gates, progress=True, description=name)
        rows[name], records[name] = result.metrics, result.records

    measure("base")
    selected = {target: report.select(k=k) for target, report in reports.items()}
    for target in ("accuracy", "length"):
        for label, gamma in (("suppressed", gamma_suppress), ("amplified", gamma_amplify)):
            measure(f"{target} {label}", gates_for_components(lm, selected[target], gamma))

    learned = GateSteering.for_model(copy.deepcopy(lm), tokenizer, ComponentSelection(components=tuple(selected["accuracy"])),
                                     reward="accuracy", num_samples=num_samples, max_new_tokens=max_new_tokens,
                                     generation_batch_size=64, learning_rate=0.1, gate_penalty=0.01, seed=seed)
    _trainer(max_steps=learning_steps, limit_val_batches=0, enable_progress_bar=True).fit(learned, datamodule=data)
    measure("accuracy learned", learned.gates, learned.lm)

    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        for target, report in reports.items():
            report.save(staging / f"attribution_{target}")
        exported = export_steered_model(learned.lm, tokenizer, learned.gates, staging / "exported_learned",
                                        source={"kind": "learned", "components": selected["accuracy"]},
                                        metrics=rows["accuracy learned"])
        check = evaluate_generations(load_model_and_tokenizer(str(staging / "exported_learned"))[0], tokenizer,
                                     test_batches, greedy, description="exported")
        export_matches = [r["completion"] for r in check.records] == [r["completion"] for r in records["accuracy learned"]]
        summary = {
            "model": model,
            "site": next(iter(reports["accuracy"].sites)),
            "k": k, "gammas": {"suppressed": gamma_suppress, "amplified": gamma_amplify},
            "selected": selected, "conditions": rows, "completeness": completeness,
            "export": {"folded_sites": exported["folded_sites"], "generations_identical": export_matches},
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        atomic_write_json(staging / "summary.json", summary)
        atomic_write_text(staging / "summary.md", format_table(rows) + "\n")
        atomic_write_text(staging / "generations.jsonl",
                          "".join(json.dumps({"condition": c, **r}) + "\n" for c, rs in records.items() for r in rs))

    print(f"\n{model}: top {k} {family} components by IPG, {test_prompts} held-out problems, greedy decoding\n")
    print(format_table(rows))
    for target, block in completeness.items():
        print(f"completeness ({target}): sum of scores {block['sum_of_scores']:.4g} vs L(1) - L(0) "
              f"{block['surrogate_delta']:.4g} (relative residual {block['relative_residual']:.2g})")
    print(f"exported learned gates (folded {exported['folded_sites']}): generations identical = {export_matches}")
    print(f"wall time {summary['wall_time_s']} s; reports, plots, metrics and the exported model are in {out_dir}/")
    return summary
