"""The attribution figure: one heatmap per site family and the top components.

:func:`plot_attribution` draws plain data (score vectors, site descriptions, the ranked top);
:func:`plot_report` draws a report into its directory, given to
:meth:`~ipg_lightning.attribution.report.AttributionReport.save` as ``extra_files`` by the callers
that want a figure (``ipg attribute``, the demo); saving a report alone imports no plotting library."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ipg_lightning.attribution.report import AttributionReport

#: The figure's file name inside a report directory.
PLOT_FILE = "attribution.png"


def plot_report(report: AttributionReport, directory: str | Path) -> Path:
    """Draw ``report`` (its heatmaps and top 20) to ``directory/attribution.png``."""
    return plot_attribution(report.scores, report.sites, report.top(20), report.metadata.method or "?", Path(directory) / PLOT_FILE)


def plot_attribution(
    scores: dict[str, torch.Tensor], sites: dict[str, dict[str, Any]], top: list[dict[str, Any]], method: str, path: str | Path
) -> Path:
    """Draw one heatmap per site family (layers x components, diverging colours around 0) and a bar
    chart of ``top`` (``{"name", "score"}`` rows), and save it to ``path``.

    It draws on its own :class:`~matplotlib.figure.Figure`: no pyplot state and no backend is touched, and
    matplotlib is imported only here."""
    from matplotlib.figure import Figure

    families: dict[str, list[str]] = {}
    for name, site in sites.items():
        families.setdefault(site["family"], []).append(name)
    figure = Figure(figsize=(10, 2.6 * (len(families) + 1)))
    axes = figure.subplots(len(families) + 1, 1, squeeze=False)
    for axis, (family, names) in zip(axes[:, 0], families.items(), strict=False):
        names.sort(key=lambda n: sites[n]["layer"])
        width = max(sites[n]["size"] for n in names)
        matrix = torch.full((len(names), width), float("nan"))
        for row, name in enumerate(names):
            matrix[row, : sites[name]["size"]] = scores[name]
        limit = float(matrix.nan_to_num(0).abs().max()) or 1.0
        image = axis.imshow(matrix.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axis.set_yticks(range(len(names)), [str(sites[n]["layer"]) for n in names])
        axis.set_ylabel("layer")
        axis.set_xlabel(f"{family} component")
        if width <= 64:
            axis.set_xticks(range(0, width, max(1, width // 16)))
        axis.set_title(f"{family} scores")
        figure.colorbar(image, ax=axis, fraction=0.03)
    bar_axis = axes[-1, 0]
    bar_axis.barh(range(len(top)), [row["score"] for row in top], color=["tab:red" if row["score"] > 0 else "tab:blue" for row in top])
    bar_axis.set_yticks(range(len(top)), [row["name"] for row in top], fontsize=7)
    bar_axis.invert_yaxis()
    bar_axis.set_title(f"top {len(top)} components (method: {method})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
