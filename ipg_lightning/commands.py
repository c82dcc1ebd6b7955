"""``ipg evaluate`` and ``ipg export``: typed functions; their docstrings are their ``--help``.

Both build a steered model the same way (:func:`build_steered_model`): the base model; fixed
steering (top-k of a report, or named components, at gate value ``gamma``); learned gates (a
``GateSteering`` checkpoint); or an exported checkpoint directory (its steering file applied).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.data.sources import SPLITS
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.export import CARD_FILE, export_steered_model
from ipg_lightning.gates import ComponentGates
from ipg_lightning.identity import IN_MEMORY_MODEL, model_identity
from ipg_lightning.learned import load_steering_checkpoint
from ipg_lightning.models import load_model_and_tokenizer
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir
from ipg_lightning.report import AttributionReport
from ipg_lightning.sites import ArchitectureSpec
from ipg_lightning.steering import ComponentSelection, gates_for_components
from ipg_lightning.trajectories import SamplingConfig
from ipg_lightning.validation import check_gamma

#: What ``ipg evaluate`` and ``ipg export`` load when neither a model, a report nor a checkpoint names one.
DEFAULT_MODEL = "tiny:llama"


@dataclass
class SteeredModel:
    """A model, its tokenizer, the gates that steer it (None: unsteered) and a description."""

    model: Any
    tokenizer: Any
    gates: ComponentGates | None
    description: dict[str, Any]


def _selection(
    report: str | None,
    k: int | None,
    fraction: float | None,
    signed: bool,
    per_layer: bool,
    family: str | None,
    components: list[str] | None,
    allow_other_model: bool,
) -> ComponentSelection | None:
    if report is None and not components:
        return None
    return ComponentSelection(
        report=report,
        k=k,
        fraction=fraction,
        signed=signed,
        per_layer=per_layer,
        family=family,
        components=tuple(components or ()),
        allow_other_model=allow_other_model,
    )


def _default_model(selection: ComponentSelection | None) -> str:
    """The model a report was computed on (the default when no ``--model`` is given), else the tiny model."""
    if selection is None or selection.report is None:
        return DEFAULT_MODEL
    recorded = AttributionReport.load(selection.report).metadata.get("model")
    if not recorded or recorded == IN_MEMORY_MODEL:
        raise ValueError(f"The report {selection.report} does not say which model it was computed on: give --model")
    return recorded


def build_steered_model(
    model: str | None = None,
    dtype: str = "float32",
    selection: ComponentSelection | None = None,
    gamma: float = 1.0,
    steering_checkpoint: str | None = None,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> SteeredModel:
    """Load a model and steer it by a selection at ``gamma``, or by a learned checkpoint.

    ``model`` defaults to the one the checkpoint or report was made on. Reports and checkpoints made
    on a model of another architecture are refused unless ``allow_other_model``. An export directory
    loads with its unfolded gates (:func:`~ipg_lightning.export.load_steered`).
    """
    if steering_checkpoint is not None:
        if selection is not None:
            raise ValueError("Give either a steering checkpoint (learned gates) or a selection with gamma, not both")
        module = load_steering_checkpoint(steering_checkpoint, model=model, allow_other_model=allow_other_model)
        description = {"kind": "learned", "model": module.model_name, "checkpoint": str(steering_checkpoint), "components": module.components}
        return SteeredModel(module.lm, module.tokenizer, module.gates, description)
    model = model or _default_model(selection)
    lm, tokenizer = load_model_and_tokenizer(model, dtype)
    kind = "exported" if (Path(model) / CARD_FILE).is_file() else "base"
    base = SteeredModel(lm, tokenizer, None, {"kind": kind, "model": model})
    if selection is None:
        return base
    components = selection.resolve(lm, model, architecture)
    base.gates = gates_for_components(lm, components, check_gamma(gamma), architecture)
    base.description = {
        "kind": "fixed",
        "model": model,
        "gamma": gamma,
        "components": components,
        "report": selection.report,
        "k": selection.k,
        "fraction": selection.fraction,
    }
    return base


def _metrics_csv(rows: list[dict[str, Any]]) -> str:
    keys = ["k", "gamma", "accuracy", "answer_rate", "reasoning_length_mean", "reflection_rate", "num_completions"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def evaluate(
    model: str | None = None,
    dtype: str = "float32",
    data: ReasoningDataModule | None = None,
    split: str = "test",
    report: str | None = None,
    k: int | None = None,
    fraction: float | None = None,
    signed: bool = True,
    per_layer: bool = False,
    family: str | None = None,
    components: list[str] | None = None,
    gamma: float = 1.0,
    gammas: list[float] | None = None,
    ks: list[int] | None = None,
    steering_checkpoint: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    num_samples: int = 1,
    generation_batch_size: int = 16,
    output_dir: str = "outputs/evaluate",
    overwrite: bool = False,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Evaluate a base, steered, learned or exported model on a benchmark split.

    Writes ``metrics.json`` (accuracy, answer rate, reasoning-length mean and distribution,
    reflection rate, number of examples) and ``generations.jsonl``. With ``gammas`` (and optionally
    ``ks``) it sweeps fixed steering instead and writes ``sweep.json``, ``sweep.csv`` and
    ``sweep.png`` (accuracy and length against gamma, one line per k).

    Args:
        model: local model directory (a plain or an exported checkpoint) or ``tiny:<family>``;
            default: the model the checkpoint or report was made on (else ``tiny:llama``).
        dtype: weights dtype.
        data: the benchmark (a ``ReasoningDataModule``: ``--data.source``, ``--data.num_test``, ...).
        split: which split to evaluate (``test`` by default; never the attribution support set).
        report: attribution report to select components from (fixed steering).
        k: top-k components of the report.
        fraction: or a share of the report's components.
        signed: rank by signed score (True) or by absolute score.
        per_layer: select per layer.
        family: only this site family.
        components: explicit component names instead of a report.
        gamma: gate value of the selected components.
        gammas: sweep these gate values (fixed steering from ``report``).
        ks: sweep these top-k values (default: ``[k]``).
        steering_checkpoint: a ``GateSteering`` checkpoint (learned gates) to evaluate.
        max_new_tokens: generation cap.
        temperature: 0 is greedy decoding (the paper's evaluation).
        num_samples: completions per prompt.
        generation_batch_size: completions generated together.
        output_dir: where results go (atomically; refused if it exists, unless ``overwrite``).
        overwrite: replace an earlier output of this library at ``output_dir`` (never other files).
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in (see ``ArchitectureSpec``).
    """
    check_output_dir(output_dir, overwrite)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {list(SPLITS)}")
    if temperature == 0 and num_samples > 1:
        raise ValueError(
            f"temperature 0 (greedy decoding) gives {num_samples} identical completions per problem: set num_samples 1, or temperature > 0"
        )
    data = data or ReasoningDataModule()
    sampling = SamplingConfig(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=generation_batch_size)
    if gammas:
        if report is None:
            raise ValueError("A sweep selects components from a report: give --report and --ks (or --k)")
        top_ks = ks or [k]
        if any(value is None for value in top_ks):
            raise ValueError("A sweep needs top-k values: give --ks [..] or --k")
        for index, value in enumerate(gammas):
            check_gamma(value, f"gammas[{index}]")
        selections = [_selection(report, top_k, None, signed, per_layer, family, None, allow_other_model) for top_k in top_ks]
        return _sweep(model, dtype, data, split, selections, gammas, sampling, output_dir, overwrite, architecture)
    check_gamma(gamma)
    selection = _selection(report, k, fraction, signed, per_layer, family, components, allow_other_model)
    steered = build_steered_model(model, dtype, selection, gamma, steering_checkpoint, allow_other_model, architecture)
    data.connect(steered.tokenizer)
    batches = list(_loader(data, split))
    result = evaluate_generations(steered.model, steered.tokenizer, batches, sampling, steered.gates, progress=True)
    summary = {
        "steering": steered.description,
        "model_identity": model_identity(steered.model, steered.description["model"]),
        "split": split,
        "data": data.source,
        "metrics": result.metrics,
    }
    with atomic_directory(output_dir, overwrite=overwrite, kind="evaluation") as staging:
        atomic_write_json(staging / "metrics.json", summary)
        atomic_write_text(staging / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in result.records))
    print(json.dumps(summary["metrics"], indent=2))
    print(f"wrote {output_dir}/metrics.json and generations.jsonl")
    return summary


def _loader(data: ReasoningDataModule, split: str):
    return {"train": data.train_dataloader, "val": data.val_dataloader, "test": data.test_dataloader}[split]()


def _sweep(model, dtype, data, split, selections: list[ComponentSelection], gammas, sampling, output_dir, overwrite, architecture) -> dict[str, Any]:
    model = model or _default_model(selections[0])
    base = build_steered_model(model, dtype)
    data.connect(base.tokenizer)
    batches = list(_loader(data, split))
    rows = [{"k": 0, "gamma": 1.0, **evaluate_generations(base.model, base.tokenizer, batches, sampling, progress=True, description="base").metrics}]
    for selection in selections:
        components = selection.resolve(base.model, model, architecture)
        for value in gammas:
            gates = gates_for_components(base.model, components, value, architecture)
            metrics = evaluate_generations(
                base.model, base.tokenizer, batches, sampling, gates, progress=True, description=f"k={selection.k} gamma={value}"
            ).metrics
            rows.append({"k": selection.k, "gamma": value, **metrics})
    with atomic_directory(output_dir, overwrite=overwrite, kind="evaluation sweep") as staging:
        atomic_write_json(
            staging / "sweep.json",
            {"report": selections[0].report, "model_identity": model_identity(base.model, model), "split": split, "rows": rows},
        )
        atomic_write_text(staging / "sweep.csv", _metrics_csv(rows))
        from ipg_lightning.plots import plot_sweep

        plot_sweep(rows, staging / "sweep.png")
    print(_metrics_csv(rows))
    print(f"wrote {output_dir}/sweep.json, sweep.csv and sweep.png")
    return {"rows": rows}


def export(
    output_dir: str,
    model: str | None = None,
    dtype: str = "float32",
    report: str | None = None,
    k: int | None = None,
    fraction: float | None = None,
    signed: bool = True,
    per_layer: bool = False,
    family: str | None = None,
    components: list[str] | None = None,
    gamma: float = 1.0,
    steering_checkpoint: str | None = None,
    metrics: str | None = None,
    overwrite: bool = False,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Fold gates (and merge LoRA) into a plain Hugging Face checkpoint with a steering card.

    Neuron, head and sub-layer gates fold exactly into weights; residual-stream gates are saved in
    ``steering.safetensors`` beside the checkpoint and re-applied by ``ipg_lightning.load_steered``.
    The card ``steering_card.json`` lists which were folded and which need the loader.

    Args:
        output_dir: new directory for the checkpoint (refused if it exists, unless ``overwrite``).
        model: the base model (local directory or ``tiny:<family>``); default: the model the
            checkpoint or report was made on.
        dtype: weights dtype.
        report: attribution report for fixed steering.
        k: top-k components of the report.
        fraction: or a share of them.
        signed: rank by signed (True) or absolute score.
        per_layer: select per layer.
        family: only this site family.
        components: explicit component names instead of a report.
        gamma: gate value of the selected components.
        steering_checkpoint: learned gates (and LoRA adapter) from ``ipg steer``.
        metrics: a ``metrics.json`` from ``ipg evaluate`` to record in the card.
        overwrite: replace an earlier output of this library at ``output_dir`` (never other files).
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in (see ``ArchitectureSpec``).
    """
    check_output_dir(output_dir, overwrite)
    check_gamma(gamma)
    selection = _selection(report, k, fraction, signed, per_layer, family, components, allow_other_model)
    if selection is None and steering_checkpoint is None:
        raise ValueError("Nothing to export: give --report/--components with --gamma, or --steering_checkpoint")
    known_metrics = _read_metrics(metrics) if metrics else None
    steered = build_steered_model(model, dtype, selection, gamma, steering_checkpoint, allow_other_model, architecture)
    card = export_steered_model(
        steered.model, steered.tokenizer, steered.gates, output_dir, source=steered.description, metrics=known_metrics, overwrite=overwrite
    )
    print(
        f"exported to {output_dir}: folded {card['folded_sites'] or 'nothing'}; "
        f"needs ipg_lightning.load_steered for {card['loader_sites'] or 'nothing'}; LoRA merged: {card['lora_merged']}"
    )
    return card


def _read_metrics(path: str) -> dict[str, Any]:
    """The metrics of an ``ipg evaluate`` output (its ``metrics.json``, or the directory holding it)."""
    file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(file.read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--metrics {path}: not a metrics.json written by `ipg evaluate` ({type(error).__name__}: {error})") from None
