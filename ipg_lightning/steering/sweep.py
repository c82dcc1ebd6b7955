"""Fixed steering swept over gate values and top-k, or steering vectors over their strength: the rows, their CSV and their figure."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipg_lightning.data import ReasoningBatch
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering.loading import SteeredModel
from ipg_lightning.steering.selection import ComponentSelection, gates_for_components

#: The metric columns of ``sweep.csv``.
METRIC_COLUMNS = ("accuracy", "answer_rate", "reasoning_length_mean", "reflection_rate", "num_completions")
#: The columns of ``sweep.csv`` for a gate sweep.
SWEEP_COLUMNS = ("k", "gamma", *METRIC_COLUMNS)
#: The columns of ``sweep.csv`` for a vector-strength sweep.
ALPHA_SWEEP_COLUMNS = ("alpha", *METRIC_COLUMNS)


def gamma_sweep(
    base: SteeredModel,
    batches: Sequence[ReasoningBatch],
    sampling: SamplingConfig,
    selections: Sequence[ComponentSelection],
    gammas: Sequence[float],
    architecture: ArchitectureSpec | None = None,
    allow_other_model: bool = False,
) -> list[dict[str, Any]]:
    """Metrics of the base model (the ``k = 0`` row) and of every selection at every gate value.

    The SAEs that selected features need are spliced into ``base.model`` first (with no gate attached
    a spliced SAE changes nothing, so the base row is the model's own), and every selection resolves
    before anything is sampled: a report that does not fit the model fails at once.
    """

    def evaluate(gates, description: str) -> dict[str, float]:
        return evaluate_generations(base.model, base.tokenizer, batches, sampling, gates, progress=True, description=description).metrics

    model_path = base.description.model
    resolved = []
    for selection in selections:
        selection.attach_saes(base.model, architecture)
        components = selection.resolve(base.model, model_path, architecture, allow_other_model)
        gates_for_components(base.model, components, 1.0, architecture)  # names every unknown component now
        resolved.append((selection.k, components))
    rows = [{"k": 0, "gamma": 1.0, **evaluate(None, "base")}]
    for top_k, components in resolved:
        for value in gammas:
            gates = gates_for_components(base.model, components, value, architecture)
            rows.append({"k": top_k, "gamma": value, **evaluate(gates, f"k={top_k} gamma={value}")})
    return rows


def alpha_sweep(steered: SteeredModel, batches: Sequence[ReasoningBatch], sampling: SamplingConfig, alphas: Sequence[float]) -> list[dict[str, Any]]:
    """Metrics of ``steered`` (its gates, if any, attached throughout) with its vectors at each strength in ``alphas``.

    The first row is alpha 0 (the vectors off: the model as its gates alone leave it), measured once
    whether or not ``alphas`` holds it. The vectors' own strength is restored afterwards.
    """
    vectors = steered.vectors
    if vectors is None:
        raise ValueError("An alpha sweep varies the strength of steering vectors: give the vector file (--vectors FILE)")
    for index, value in enumerate(alphas):
        if not math.isfinite(value):
            raise ValueError(f"alphas[{index}] must be a finite number, got {value}")
    original, rows = vectors.alpha, []
    try:
        for value in dict.fromkeys([0.0, *map(float, alphas)]):  # each strength once, alpha 0 first
            vectors.alpha = value
            result = evaluate_generations(
                steered.model, steered.tokenizer, batches, sampling, steered.gates, vectors, progress=True, description=f"alpha={value}"
            )
            rows.append({"alpha": value, **result.metrics})
    finally:
        vectors.alpha = original
    return rows


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with :data:`SWEEP_COLUMNS` (:data:`ALPHA_SWEEP_COLUMNS` for a vector-strength sweep)."""
    out = io.StringIO()
    columns = ALPHA_SWEEP_COLUMNS if rows and "alpha" in rows[0] else SWEEP_COLUMNS
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Accuracy and mean reasoning length against gamma, one line per k (the k = 0 row is the base model);
    for a vector-strength sweep, against alpha (the alpha = 0 row is the model without its vectors).

    Drawn on its own :class:`~matplotlib.figure.Figure` (no pyplot state, no backend touched)."""
    from matplotlib.figure import Figure

    if rows and "alpha" in rows[0]:
        x, x_label = "alpha", "vector strength alpha"
        base = next((row for row in rows if row["alpha"] == 0), None)
        lines = {"vectors": rows}
    else:
        x, x_label = "gamma", "gate value gamma"
        base = next((row for row in rows if row["k"] == 0), None)
        lines = {f"k = {top_k}": [row for row in rows if row["k"] == top_k] for top_k in sorted({row["k"] for row in rows if row["k"] != 0})}
    figure = Figure(figsize=(10, 3.8))
    accuracy_axis, length_axis = figure.subplots(1, 2)
    for label, line in lines.items():
        line = sorted(line, key=lambda row: row[x])
        values = [row[x] for row in line]
        accuracy_axis.plot(values, [row["accuracy"] for row in line], marker="o", label=label)
        length_axis.plot(values, [row["reasoning_length_mean"] for row in line], marker="o", label=label)
    if base is not None:
        accuracy_axis.axhline(base["accuracy"], color="grey", linestyle="--", label="base")
        length_axis.axhline(base["reasoning_length_mean"], color="grey", linestyle="--", label="base")
    for axis, label in ((accuracy_axis, "accuracy"), (length_axis, "mean reasoning length (tokens)")):
        axis.set_xlabel(x_label)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
