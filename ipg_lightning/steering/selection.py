"""Fixed steering: choose components (from a report or by name) and set their gates.

Selected components get a gate value gamma (> 1 amplifies, < 1 suppresses, 0 ablates) or one value
each; every other gate stays at 1. The result is an ordinary :class:`ComponentGates`, so the same
object steers generation, trains (``GateSteering``) and folds into weights (``ipg export``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.gates.component_gates import ComponentGates, parse_component_name
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import ModelMismatchError, check_same_model
from ipg_lightning.model.sites import find_site
from ipg_lightning.sae import IN_MEMORY_SAE, attach_saes


@dataclass(frozen=True)
class ComponentSelection:
    """Which components to steer: the top of an attribution report, or explicit names.

    Args:
        report: directory of an attribution report (``ipg attribute`` output).
        k: number of top components (globally, or per layer with ``per_layer``).
        fraction: or a share of the candidates instead of ``k``. A selection from a report needs
            one of the two before it resolves; a sweep may leave both out and give its own top-k values.
        signed: rank by signed score (the paper's default) or by absolute score.
        per_layer: take the top of each layer separately.
        family: only components of this site family.
        components: explicit component names (used instead of a report), e.g.
            ``["blocks.3.attn.hook_z[2]", "blocks.3.mlp.hook_post[117]"]``.
        saes: SAE directories whose features (``...hook_resid_post.sae[i]``) are selected; default:
            the SAEs the report was computed with.
    """

    report: str | None = None
    k: int | None = None
    fraction: float | None = None
    signed: bool = True
    per_layer: bool = False
    family: str | None = None
    components: tuple[str, ...] = ()
    saes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.report is None) == (not self.components):
            raise ValueError("Select components either from a report (report=..., k=...) or by name (components=[...])")
        if self.k is not None and self.fraction is not None:
            raise ValueError("Selecting from a report needs exactly one of k or fraction, not both")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        object.__setattr__(self, "components", tuple(self.components))
        object.__setattr__(self, "saes", tuple(self.saes))

    def sae_paths(self) -> list[str]:
        """The SAEs the selected features need: ``saes`` if given, else those the report recorded."""
        if self.saes or self.report is None or self.family not in (None, "sae_feature"):
            return list(self.saes)  # a selection of another family needs none of the report's SAEs
        recorded = AttributionReport.load(Path(self.report)).metadata.saes
        missing = [path for path in recorded.values() if not Path(path).is_dir()]
        if IN_MEMORY_SAE in missing:
            raise ValueError(f"The report {self.report} used an SAE that was never saved: save it (save_sae) and pass its path as `saes`")
        if missing:
            raise FileNotFoundError(f"The report {self.report} was computed with SAEs that are not at {missing} any more; give their paths as `saes`")
        return list(recorded.values())

    def attach_saes(self, model: nn.Module, architecture: ArchitectureSpec | None = None) -> None:
        """Splice the SAEs the selection needs into ``model`` (before it resolves against the model)."""
        attach_saes(model, self.sae_paths(), architecture)

    def check_count(self) -> None:
        """Refuse a selection from a report that says neither how many (``k``) nor what share (``fraction``)."""
        if self.report is not None and self.k is None and self.fraction is None:
            raise ValueError("Selecting from a report needs exactly one of k or fraction")

    def resolve(
        self,
        model: nn.Module | None = None,
        model_name: str = "the model",
        architecture: ArchitectureSpec | None = None,
        allow_other_model: bool = False,
    ) -> list[str]:
        """The selected component names; with ``model``, a report must have been computed on that model.

        Args:
            model: the model the selection will steer. A report from another architecture, or whose
                site sizes differ from this model's, is refused unless ``allow_other_model``.
            model_name: how the model is named in messages (its path or alias).
            architecture: the model's module paths, if it is not a built-in architecture.
            allow_other_model: apply a report computed on a model of another architecture (refused
                by default: its component indices would mean other units).
        """
        if self.components:
            return list(self.components)
        self.check_count()
        report = AttributionReport.load(Path(self.report))
        if model is not None:
            what = f"The report {self.report}"
            check_same_model(report.metadata.model_identity, model, model_name, what, allow_other_model)
            if not allow_other_model:
                candidates = {name: site for name, site in report.sites.items() if self.family in (None, site["family"])}
                check_sites_fit(candidates, model, what, architecture)
        return report.select(k=self.k, fraction=self.fraction, signed=self.signed, per_layer=self.per_layer, family=self.family)


def check_sites_fit(sites: Mapping[str, Mapping], model: nn.Module, what: str, architecture: ArchitectureSpec | None = None) -> None:
    """Refuse sites (name -> ``{"size": ...}``) that ``model`` does not have at that size."""
    for site_name, description in sites.items():
        try:
            site = find_site(model, site_name, architecture)
        except ValueError as error:
            raise ModelMismatchError(f"{what} names {site_name}, which this model does not have: {error}") from None
        if site.size != description["size"]:
            raise ModelMismatchError(
                f"{what} has {description['size']} components at {site_name}, this model has {site.size}: it was computed on another model"
            )


def gates_for_components(
    model: nn.Module,
    components: Sequence[str],
    values: float | Mapping[str, float] = 1.0,
    architecture: ArchitectureSpec | None = None,
) -> ComponentGates:
    """Gates for exactly the sites that hold ``components``, with those set to ``values``.

    ``values`` is one gamma for all, or a value per component name. Unknown names and non-finite
    values raise errors naming them.
    """
    if not components:
        raise ValueError("No components to steer")
    by_site: dict[str, list[str]] = {}
    for name in components:
        site_name, _ = parse_component_name(name)
        by_site.setdefault(site_name, []).append(name)
    sites = []
    for site_name in by_site:
        sites.append(find_site(model, site_name, architecture))
    gates = ComponentGates(sites).to(next(model.parameters()).device)  # where the model runs
    for name in components:
        value = values[name] if isinstance(values, Mapping) else values
        gates.set_component(name, float(value))
    return gates


def component_mask(gates: ComponentGates, components: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per site, a 0/1 float mask of the selected components (for training only those gates)."""
    masks = {name: torch.zeros(site.size) for name, site in gates.sites.items()}
    for component in components:
        site_name, index = parse_component_name(component)
        masks[site_name][index or 0] = 1.0
    return masks
