"""Attribution reports: per-site score tensors plus everything needed to trust and reuse them.

A report directory holds ``attribution.safetensors`` (one score vector per site),
``attribution.json`` (config, model and data identifiers, counts, mean reward, the completeness
check and the top components) and, when the run kept them, ``trajectories.json``
(:mod:`~ipg_lightning.attribution.kept`). It is written atomically: either all its files exist under
the final name, or none do. A caller that wants a figure beside the data draws it into the same
atomic write (``report.save(directory, extra_files=partial(plot_report, report))``); the report
itself never imports a plotting library.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ipg_lightning.attribution.kept import TRAJECTORIES_FILE, KeptTrajectories
from ipg_lightning.attribution.metadata import TRAJECTORIES_DIGEST, ReportCounts, ReportMetadata
from ipg_lightning.outputs import atomic_directory, atomic_write_json

SCORES_FILE = "attribution.safetensors"
METADATA_FILE = "attribution.json"

log = logging.getLogger(__name__)


class UninformativeReportError(ValueError):
    """A report whose scores carry no information (e.g. no prompt carried signal); selecting from it is refused."""


@dataclass
class AttributionReport:
    """Scores of components, keyed by site name (e.g. ``blocks.3.hook_resid_post``).

    Args:
        scores: one score vector per site.
        sites: per site, its ``family``, ``layer`` and ``size``.
        metadata: how the scores came to be (:class:`~ipg_lightning.attribution.metadata.ReportMetadata`;
            a mapping of its entries is read into one).
        trajectories: the sampled trajectories the scores came from, if the run kept them.
    """

    scores: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]]
    metadata: ReportMetadata = field(default_factory=ReportMetadata)
    trajectories: KeptTrajectories | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metadata, Mapping):
            self.metadata = ReportMetadata.from_json(dict(self.metadata))
        for name, vector in self.scores.items():
            if name not in self.sites or vector.shape != (self.sites[name]["size"],):
                raise ValueError(f"Scores of {name} do not match its site description {self.sites.get(name)}")

    def component_name(self, site_name: str, index: int) -> str:
        """The component's report name, e.g. ``blocks.3.attn.hook_z[2]``."""
        return site_name if self.sites[site_name]["size"] == 1 else f"{site_name}[{index}]"

    def ranked(self, signed: bool = True, family: str | None = None) -> list[tuple[str, float, str]]:
        """All components as ``(name, score, site)``, highest first (by score, or by |score|)."""
        rows = []
        for site_name, vector in self.scores.items():
            if family is not None and self.sites[site_name]["family"] != family:
                continue
            for index, value in enumerate(vector.tolist()):
                rows.append((self.component_name(site_name, index), value, site_name))
        rows.sort(key=lambda row: row[1] if signed else abs(row[1]), reverse=True)
        return rows

    def select(
        self,
        k: int | None = None,
        fraction: float | None = None,
        signed: bool = True,
        per_layer: bool = False,
        family: str | None = None,
    ) -> list[str]:
        """Names of the top components.

        Args:
            k: how many (globally, or per layer with ``per_layer``).
            fraction: or what share of the candidates (exactly one of ``k`` and ``fraction``).
            signed: rank by signed score (the paper's default) or by absolute score.
            per_layer: take the top of each layer separately instead of globally.
            family: only components of this site family.
        """
        if (k is None) == (fraction is None):
            raise ValueError("Give exactly one of k (a count) or fraction (a share)")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if k is not None and k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.check_informative()
        ranked = self.ranked(signed=signed, family=family)
        if not ranked:
            families = sorted({site["family"] for site in self.sites.values()})
            raise ValueError(f"The report has no components of family {family!r}; it has {families}")
        groups: dict[Any, list] = {}
        for row in ranked:
            key = self.sites[row[2]]["layer"] if per_layer else None
            groups.setdefault(key, []).append(row)
        chosen = []
        for key, rows in groups.items():
            if k is not None and k > len(rows):
                where = f"layer {key} of the report" if per_layer else "the report"
                raise ValueError(
                    f"k={k}, but {where} has only {len(rows)} components{f' of family {family}' if family else ''}: "
                    f"choose k <= {len(rows)}, or a fraction"
                )
            count = k if k is not None else math.ceil(fraction * len(rows))
            chosen.extend(rows[:count])
        chosen.sort(key=lambda row: row[1] if signed else abs(row[1]), reverse=True)
        return [name for name, _, _ in chosen]

    def uninformative_reason(self) -> str | None:
        """Why the scores carry no information to select by (marked at attribution, or all zero), else None."""
        if self.metadata.degenerate:
            return self.metadata.degenerate
        if all(torch.count_nonzero(vector) == 0 for vector in self.scores.values()):
            return "every score is exactly 0"
        return None

    def check_informative(self) -> None:
        """Raise :class:`UninformativeReportError` if the scores carry no information to select by."""
        reason = self.uninformative_reason()
        if reason is not None:
            raise UninformativeReportError(f"Cannot select components from this report: {reason}")

    def top(self, n: int = 20, signed: bool = True) -> list[dict[str, Any]]:
        """The ``n`` highest-ranked components as ``{"name", "score"}`` dicts."""
        return [{"name": name, "score": score} for name, score, _ in self.ranked(signed)[:n]]

    def summary(self, output_dir: str | Path | None = None, top_n: int = 10) -> str:
        """A few lines to read after attribution: counts, mean reward, completeness, the top components."""
        meta = self.metadata
        counts = meta.counts or ReportCounts()
        lines = [
            f"method {meta.method} on {meta.model}: {counts.prompts} prompts, {counts.trajectories} trajectories, "
            f"{counts.completion_tokens} completion tokens, {meta.wall_time_s} s",
        ]
        if meta.mean_reward is not None:
            lines.append(f"mean reward at gates = 1: {meta.mean_reward:.4f}")
        if counts.zero_signal_prompts is not None:
            lines.append(f"zero-signal prompts (all N rewards equal, skipped): {counts.zero_signal_prompts}")
        if meta.completeness is not None:
            c = meta.completeness
            lines.append(
                f"completeness: sum of scores {c.sum_of_scores:.6g} vs {c.target} {c.surrogate_delta:.6g} "
                f"(residual {c.residual:.3g}, relative {c.relative_residual:.3g})"
            )
        lines.append(f"top {top_n}:")
        lines += [f"  {row['name']:<36} {row['score']:+.6g}" for row in self.top(top_n)]
        lines.append(f"report written to {output_dir}" if output_dir else "report kept in memory only (no output_dir given)")
        return "\n".join(lines)

    def save(self, directory: str | Path, overwrite: bool = False, top_n: int = 50, extra_files: Callable[[Path], object] | None = None) -> Path:
        """Write the report atomically into ``directory`` (see the module docstring).

        Args:
            directory: the report's directory (created; refused if it exists, unless ``overwrite``
                and it holds an earlier output of this library).
            overwrite: replace an earlier report at ``directory``.
            top_n: how many top components ``attribution.json`` lists.
            extra_files: called with the staging directory before it is published, to write more
                files (a figure) that appear with the report or not at all.
        """
        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite, kind="attribution report") as staging:
            save_file({name: t.contiguous().float() for name, t in self.scores.items()}, str(staging / SCORES_FILE))
            payload = {**self.metadata.to_json(), "sites": self.sites, "top": self.top(top_n)}
            payload.pop(TRAJECTORIES_DIGEST, None)
            if self.trajectories is not None:  # its digest lets a reader tell an edited file from the one the scores came from
                payload[TRAJECTORIES_DIGEST] = self.trajectories.save(staging / TRAJECTORIES_FILE)
            atomic_write_json(staging / METADATA_FILE, payload)
            if extra_files is not None:
                extra_files(staging)
        return directory

    @classmethod
    def load(cls, directory: str | Path, trajectories: bool = False) -> AttributionReport:
        """Read a report written by :meth:`save`; with ``trajectories``, also its kept trajectories (if it has them)."""
        directory = Path(directory)
        for name in (SCORES_FILE, METADATA_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not an attribution report: {name} is missing")
        damaged_report = "the report is damaged (truncated or edited): run the attribution again"
        try:
            payload = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
            sites = payload.pop("sites")
            payload.pop("top", None)
            metadata = ReportMetadata.from_json(payload)
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            raise ValueError(f"{directory / METADATA_FILE} cannot be read ({type(error).__name__}: {error}); {damaged_report}") from None
        try:
            scores = load_file(str(directory / SCORES_FILE))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{directory / SCORES_FILE} cannot be read ({error}); {damaged_report}") from None
        damaged = [name for name, vector in scores.items() if not torch.isfinite(vector).all()]
        if damaged:
            raise ValueError(f"{directory / SCORES_FILE} holds non-finite scores (NaN or inf) for {damaged[:3]}; {damaged_report}")
        kept = directory / TRAJECTORIES_FILE
        loaded = None
        if trajectories and kept.is_file():
            if metadata.trajectories_sha256 is None:
                log.warning("%s records no digest of %s (an older version wrote it): edits to it cannot be detected", directory, TRAJECTORIES_FILE)
            loaded = KeptTrajectories.load(kept, metadata.trajectories_sha256)
            counts = metadata.counts
            if counts is not None and (counts.prompts, counts.trajectories) != (len(loaded.prompts), len(loaded)):
                raise ValueError(
                    f"{kept} holds {len(loaded.prompts)} prompts and {len(loaded)} trajectories, but the report counts "
                    f"{counts.prompts} and {counts.trajectories}: they are not the ones its scores came from; run the attribution again"
                )
        return cls(scores=scores, sites=sites, metadata=metadata, trajectories=loaded)
