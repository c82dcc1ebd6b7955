"""Figures: attribution heatmaps with the top components."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from ipg_lightning.report import AttributionReport


def plot_attribution(report: AttributionReport, path: str | Path, top_n: int = 20) -> Path:
    """One heatmap per site family (layers x components, diverging colours around 0) and a bar
    chart of the ``top_n`` components by signed score."""
    families: dict[str, list[str]] = {}
    for name, site in report.sites.items():
        families.setdefault(site["family"], []).append(name)
    figure, axes = plt.subplots(len(families) + 1, 1, figsize=(10, 2.6 * (len(families) + 1)), squeeze=False)
    for axis, (family, names) in zip(axes[:, 0], families.items()):
        names.sort(key=lambda n: report.sites[n]["layer"])
        width = max(report.sites[n]["size"] for n in names)
        matrix = torch.full((len(names), width), float("nan"))
        for row, name in enumerate(names):
            matrix[row, : report.sites[name]["size"]] = report.scores[name]
        limit = float(matrix.nan_to_num(0).abs().max()) or 1.0
        image = axis.imshow(matrix.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axis.set_yticks(range(len(names)), [str(report.sites[n]["layer"]) for n in names])
        axis.set_ylabel("layer")
        axis.set_xlabel("head" if family == "attn_head" else "component")
        if width <= 64:
            axis.set_xticks(range(0, width, max(1, width // 16)))
        axis.set_title(f"{family} scores")
        figure.colorbar(image, ax=axis, fraction=0.03)
    top = report.top(top_n)
    bar_axis = axes[-1, 0]
    bar_axis.barh(range(len(top)), [row["score"] for row in top], color=["tab:red" if row["score"] > 0 else "tab:blue" for row in top])
    bar_axis.set_yticks(range(len(top)), [row["name"] for row in top], fontsize=7)
    bar_axis.invert_yaxis()
    bar_axis.set_title(f"top {len(top)} components (method: {report.metadata.get('method', '?')})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """Accuracy and mean reasoning length against gamma, one line per k (the k = 0 row is the base model)."""
    base = next((row for row in rows if row["k"] == 0), None)
    figure, (accuracy_axis, length_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    plt.close(figure)
    return Path(path)
