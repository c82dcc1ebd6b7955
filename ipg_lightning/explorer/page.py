"""The explorer page: one self-contained HTML file (inline script and style, no network) for an attribution report.

:func:`explore` is what ``ipg explore REPORT_DIR`` runs: it reloads the report's model, replays the
report's kept trajectories (:mod:`~ipg_lightning.explorer.traces`), and writes the page
(:func:`write_page`) with the ranking, the traced components, their trajectories shaded token by
token, and the measured effects of steering them when ``ipg evaluate`` outputs are given.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.metadata import Quadrature
from ipg_lightning.attribution.methods import METHODS, methods_that
from ipg_lightning.attribution.paths import site_path_groups
from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.checks import check_at_least
from ipg_lightning.checks import check_device as checked_device
from ipg_lightning.explorer.payload import Effects, explorer_payload, read_evaluations
from ipg_lightning.explorer.traces import ComponentTrace, ScorePath, trace_components
from ipg_lightning.explorer.vector_traces import trace_vectors, vector_directions
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import IN_MEMORY_MODEL, check_same_model, same_model_name
from ipg_lightning.model.loading import load_model_and_tokenizer
from ipg_lightning.model.sites import Site, find_site, unwrap_model
from ipg_lightning.outputs import atomic_write_text, check_writable, read_manifest
from ipg_lightning.steering.selection import ComponentSelection
from ipg_lightning.vectors import SteeringVectors, load_vectors
from ipg_lightning.vectors.files import read_vector_metadata

logger = logging.getLogger(__name__)

#: Marks a page this library wrote, so ``overwrite`` never replaces another file.
GENERATOR = "ipg_lightning explorer"


def render_page(payload: dict[str, Any]) -> str:
    """The page's HTML with ``payload`` embedded as JSON (``<`` escaped, so no text can close the script)."""
    template = files("ipg_lightning.explorer").joinpath("page.html").read_text(encoding="utf-8")
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = payload["title"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    head = f'<meta name="generator" content="{GENERATOR}">'
    before, after = template.split("__DATA__")  # the data holds no "<", so the title's marker cannot be in it
    return before.replace("<title>__TITLE__</title>", f"{head}\n<title>{title}</title>") + data + after


def embedded_payload(html: str) -> dict[str, Any]:
    """The JSON a page embeds (the inverse of :func:`render_page`)."""
    start = html.index('<script type="application/json" id="explorer-data">')
    start = html.index(">", start) + 1
    return json.loads(html[start : html.index("</script>", start)])


def check_page_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output path that exists (unless ``overwrite`` and it is an explorer page this library wrote), a new file
    inside another output of this library, or a folder that cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"The explorer writes one HTML page: give an output path ending in .html, not {path}")
    if path.is_symlink() or path.is_dir():
        raise FileExistsError(f"Refusing to write {path}: it is a directory or a symbolic link; choose another output path")
    resolved = path.resolve()
    for folder in resolved.parents:
        manifest = read_manifest(folder)
        if manifest is not None and resolved.relative_to(folder).as_posix() not in manifest["files"]:
            raise ValueError(
                f"Refusing to write {path} inside {folder}, an output of ipg_lightning: a file it did not write would stop "
                f"overwrite from replacing it; write the page beside it (e.g. {folder}.html)"
            )
    check_writable(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another output path, or set overwrite to replace an earlier explorer page")
        with path.open("rb") as file:
            head = file.read(4096).decode("utf-8", errors="replace")
        if GENERATOR not in head:
            raise FileExistsError(f"Refusing to overwrite {path}: it is not an explorer page written by ipg_lightning; choose another output path")
    return path


def check_device(device: str) -> torch.device:
    """The replay device, refused before any model loads when it is not a device name or this machine has no such device."""
    return checked_device(device, "the explorer replays")


def write_page(payload: dict[str, Any], output: str | Path, overwrite: bool = False) -> Path:
    """Write the page for ``payload`` to ``output`` atomically (refused as in :func:`check_page_output`)."""
    output = check_page_output(output, overwrite)
    return atomic_write_text(output, render_page(payload))


def score_path(report: AttributionReport) -> tuple[ScorePath | None, str | None]:
    """How the report integrated, to split its scores by token; or None and the reason there is no such split."""
    meta, config = report.metadata, report.metadata.config
    method = meta.method
    if method not in METHODS or not METHODS[method].splits_per_token:
        splitting = " and ".join(methods_that("splits_per_token"))
        return None, f"Per-token contributions exist for {splitting}; this report is {method}, so the page shades activations only."
    if config.get("estimation") != "fixed":
        return None, (
            "Per-token contributions need the trajectories the scores came from; with estimation resample each quadrature point sampled its own."
        )
    if config.get("credit", "full") != "full":
        return None, "Per-token contributions are shown for credit full; this report used local credit."
    effective = meta.effective or Quadrature(steps=config["steps"], rule=config["rule"])
    groups = site_path_groups({name: site["family"] for name, site in report.sites.items()}, config.get("path", "layer"))
    baseline, surrogate = float(config.get("baseline", 0.0)), config.get("surrogate", "sum")
    return ScorePath(effective.rule, int(effective.steps), baseline, groups, surrogate), None


def check_replayable(report: AttributionReport, model: torch.nn.Module, sites: dict[str, Site]) -> None:
    """Refuse, naming the first problem, a report whose sites or kept trajectories ``model`` cannot replay
    (sites of other sizes, token ids beyond its vocabulary, trajectories longer than its context)."""
    resized = [
        f"{name} ({report.sites[name]['size']} in the report, {site.size} here)"
        for name, site in sites.items()
        if site.size != report.sites[name]["size"]
    ]
    if resized:
        raise ValueError(f"The model's sites differ in size from the report's, so its components cannot be traced: {', '.join(resized[:3])}")
    config = unwrap_model(model).config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    report.trajectories.check_replayable(unwrap_model(model).get_input_embeddings().num_embeddings, max_positions)


def traced_components(report: AttributionReport, sites: dict[str, Site], count: int) -> list[str]:
    """The ``count`` components with the largest |score| among sites a hook can read (not fused expert weights)."""
    readable = [row for row in report.ranked(signed=False) if not sites[row[2]].kind.scales_weight]
    return [name for name, _, _ in readable[:count]]


def drifted_scores(report: AttributionReport, traces: dict[str, ComponentTrace], rel_tol: float = 0.01) -> list[tuple[str, float, float]]:
    """The traced components whose per-token contributions do not add up to their score in the report.

    Each is ``(name, recomputed, recorded)``. They agree to float precision when the replay runs the
    attribution's own model, dtype and SAEs; a gap means the page shows another computation (a
    model given with ``allow_other_model``, other weights under the same name, another dtype). A gap
    counts when it exceeds ``rel_tol`` of the recorded score plus ``rel_tol / 10`` of the largest
    traced |score|, so that components with near-zero scores do not raise it on rounding alone.
    """
    recorded = {name: score for name, score, _ in report.ranked(signed=True)}
    traced = {name: trace.score for name, trace in traces.items() if trace.score is not None}
    scale = max((abs(recorded[name]) for name in traced), default=0.0)
    return [
        (name, score, recorded[name])
        for name, score in traced.items()
        if abs(score - recorded[name]) > rel_tol * abs(recorded[name]) + rel_tol / 10 * scale
    ]


def explore(
    report_dir: str,
    output: str | None = None,
    model_path: str | None = None,
    evaluations: list[str] | None = None,
    components: int = 50,
    trajectories_per_component: int = 8,
    max_listed: int = 5000,
    chunk_size: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_other_model: bool = False,
    saes: list[str] | None = None,
    progress: bool = True,
    contributions: bool = True,
    vectors: list[str] | None = None,
) -> Path:
    """Write an HTML explorer page for an attribution report that kept its trajectories.

    The page lists the ranked components (sortable, filterable by family and layer) and, for the
    ``components`` with the largest |score|, shows the kept trajectories where each peaks highest,
    every token shaded by its activation or by its contribution to the score (ipg and grad_x_act
    with fixed estimation), whether each was right and how long it was, where in the reasoning the
    component fires, its score on each prompt, and the measured effect of steering it when
    ``evaluations`` are given. With ``vectors``, the page also shows each steering vector's direction
    on the trajectories: the projection of its site's activation on it at every token, where in the
    reasoning it is high, and how each trajectory's mean projection goes with its reward, length and
    correctness. The page is self-contained: it loads nothing from the network.

    Args:
        report_dir: an attribution report run with ``keep_trajectories: true``.
        output: the page (default: the report directory's path with ``.html`` added).
        model_path: the model to replay the trajectories through (default: the report's).
        evaluations: ``ipg evaluate`` output directories (the base model, fixed steering of selections).
        components: how many components to trace (the rest are listed with their scores only).
        trajectories_per_component: how many trajectories each traced component (and each vector) shows.
        max_listed: how many components the ranking lists at most (those with the largest |score|).
        chunk_size: trajectories per forward/backward pass (default: the report's).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace an earlier explorer page at ``output``.
        allow_other_model: replay through a model whose architecture differs from the report's (its sites
            must still have the report's sizes).
        saes: where the report's SAEs are now, if they moved since the attribution (default: where it recorded them).
        progress: show progress bars.
        contributions: split the scores by token (a replay of the report's whole path integral,
            the page's main cost); false shades activations only, and the page says so.
        vectors: steering-vector files (``ipg vectors``; an export's ``steering_vectors.safetensors``) built on the report's
            model, whose directions the page shows on the trajectories (each with ``trajectories_per_component`` of them).
    """
    report_path = Path(report_dir).resolve()
    output_path = Path(output) if output else report_path.parent / f"{report_path.name}.html"
    check_page_output(output_path, overwrite)
    check_at_least(1, components=components, trajectories_per_component=trajectories_per_component, max_listed=max_listed)
    if chunk_size is not None:
        check_at_least(1, chunk_size=chunk_size)
    replay_device = check_device(device)
    report = AttributionReport.load(report_path, trajectories=True)
    if report.trajectories is None:
        raise ValueError(
            f"The report {report_dir} kept no trajectories: run the attribution again with keep_trajectories true (--model.keep_trajectories true)"
        )
    identity = report.metadata.model_identity
    effects = read_evaluations(evaluations, identity, f"The report {report_dir}", allow_other_model) if evaluations else None
    recorded = report.metadata.model
    if model_path is not None and isinstance(recorded, str) and not same_model_name(model_path, recorded):
        logger.warning(
            "The report %s was computed on %s; replaying it through %s: the page shows that model's activations", report_dir, recorded, model_path
        )
    model_path = model_path or recorded
    if not isinstance(model_path, str) or model_path == IN_MEMORY_MODEL:
        raise ValueError(f"The report {report_dir} does not say which model it was computed on: give it with --model_path")
    config = report.metadata.config
    architecture = ArchitectureSpec(**config["architecture"]) if config.get("architecture") else None
    labels = vector_labels(vectors or [])
    lm, tokenizer = load_model_and_tokenizer(model_path, config.get("dtype", "float32"))
    check_same_model(report.metadata.model_identity, lm, model_path, f"The report {report_dir}", allow_other_model)
    loaded = {label: load_vectors(path, lm, model_path, allow_other_model, architecture) for label, path in labels.items()}
    ComponentSelection(report=str(report_path), k=1, saes=tuple(saes or ())).attach_saes(lm, architecture)
    lm.to(replay_device).eval()
    written = page_for_report(
        report,
        lm,
        tokenizer,
        output_path,
        effects,
        components,
        trajectories_per_component,
        max_listed,
        chunk_size,
        architecture,
        overwrite,
        progress,
        contributions=contributions,
        vectors=loaded,
    )
    print(f"wrote {written} ({len(report.trajectories)} kept trajectories replayed); open it in a browser")
    return written


def vector_labels(paths: list[str]) -> dict[str, str]:
    """Each vector file by the label the page names it with (its file name without ``.safetensors``); refuses two files of one name."""
    labels: dict[str, str] = {}
    for path in paths:
        read_vector_metadata(path)  # a missing or damaged file is refused before any model loads
        label = Path(path).name.removesuffix(".safetensors")
        if label in labels and Path(labels[label]).resolve() == Path(path).resolve():
            raise ValueError(f"The vector file {path} is given twice; give it once")
        if label in labels:
            raise ValueError(f"Two vector files are named {Path(path).name} ({labels[label]} and {path}): the page names vectors by file; rename one")
        labels[label] = str(path)
    return labels


def page_for_report(
    report: AttributionReport,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output: str | Path,
    effects: Effects | None = None,
    components: int = 50,
    trajectories_per_component: int = 8,
    max_listed: int = 5000,
    chunk_size: int | None = None,
    architecture: ArchitectureSpec | None = None,
    overwrite: bool = False,
    progress: bool = False,
    title: str | None = None,
    contributions: bool = True,
    vectors: dict[str, SteeringVectors] | None = None,
) -> Path:
    """The page for a report held in memory, over its model already loaded (SAEs attached); see :func:`explore`.
    ``vectors`` are steering vectors built on that model, by the label the page names them with."""
    if report.trajectories is None:
        raise ValueError("The report kept no trajectories: attribute with keep_trajectories=True")
    check_page_output(output, overwrite)
    sites = {name: find_site(model, name, architecture) for name in report.sites}
    check_replayable(report, model, sites)
    path, reason = score_path(report)
    if path is not None and not contributions:
        path, reason = None, "Per-token contributions were left out (contributions false); ipg explore computes them by default."
    if vectors:
        vector_directions(vectors)  # a vector without direction is refused before the replays
    chosen = traced_components(report, sites, components)
    chunk_size = chunk_size or int(report.metadata.config.get("chunk_size", 8))
    traces = trace_components(model, sites, chosen, report.trajectories, path, trajectories_per_component, chunk_size, progress, architecture)
    projected = trace_vectors(model, vectors, report.trajectories, trajectories_per_component, chunk_size, progress) if vectors else None
    notes = [reason] if reason else []
    if drifted := drifted_scores(report, traces):
        name, recomputed, recorded = drifted[0]
        notes.append(
            f"The per-token contributions of {len(drifted)} of the {len(traces)} traced components do not add up to their report scores "
            f"(e.g. {name}: {recomputed:.4g} against {recorded:.4g}): this replay is not the attribution's computation "
            "(another model, weights or dtype), so the contributions show this model's, not the report's."
        )
        logger.warning(notes[-1])
    payload = explorer_payload(report, traces, tokenizer, effects, max_listed, title=title, notes=notes, vectors=projected)
    return write_page(payload, output, overwrite)
