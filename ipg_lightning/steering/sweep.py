"""Fixed steering swept over gate values and top-k: the rows, their CSV and their figure."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipg_lightning.data import ReasoningBatch
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering.loading import SteeredModel
from ipg_lightning.steering.selection import ComponentSelection, gates_for_components

#: The columns of ``sweep.csv``.
SWEEP_COLUMNS = ("k", "gamma", "accuracy", "answer_rate", "reasoning_length_mean", "reflection_rate", "num_completions")


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


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with :data:`SWEEP_COLUMNS`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Accuracy and mean reasoning length against gamma, one line per k (the k = 0 row is the base model).

    Drawn on its own :class:`~matplotlib.figure.Figure` (no pyplot state, no backend touched)."""
    from matplotlib.figure import Figure

    base = next((row for row in rows if row["k"] == 0), None)
    figure = Figure(figsize=(10, 3.8))
    accuracy_axis, length_axis = figure.subplots(1, 2)
    for top_k in sorted({row["k"] for row in rows if row["k"] != 0}):
        line = sorted((row for row in rows if row["k"] == top_k), key=lambda row: row["gamma"])
        gammas = [row["gamma"] for row in line]
        accuracy_axis.plot(gammas, [row["accuracy"] for row in line], marker="o", label=f"k = {top_k}")
        length_axis.plot(gammas, [row["reasoning_length_mean"] for row in line], marker="o", label=f"k = {top_k}")
    if base is not None:
        accuracy_axis.axhline(base["accuracy"], color="grey", linestyle="--", label="base")
        length_axis.axhline(base["reasoning_length_mean"], color="grey", linestyle="--", label="base")
    for axis, label in ((accuracy_axis, "accuracy"), (length_axis, "mean reasoning length (tokens)")):
        axis.set_xlabel("gate value gamma")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
