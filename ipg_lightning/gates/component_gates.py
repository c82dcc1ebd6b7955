"""Multiplicative component gates: the one knob for attribution, steering and export.

Every component of a site gets a gate ``c_i`` (1 = untouched) that multiplies its activation at
every position, prompt and generated tokens alike, in plain forward passes and in ``generate`` with
a KV cache. Gates are ``nn.Parameter`` vectors, one per site, so they can be differentiated
(attribution) or trained (steering) while the model's own weights stay frozen.

Example:
    >>> from ipg_lightning.zoo.tiny import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> gates = ComponentGates.for_model(model, families=["mlp_neuron"], layers=[0])
    >>> gates.set_component("blocks.0.mlp.hook_post[3]", 0.0)
    >>> with gates.attach(model):
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    >>> gates.num_components
    64
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ipg_lightning.model.autoencoder import same_sae
from ipg_lightning.model.experts import WeightGateHandle, gate_weight
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.interventions import Handle, install_intervention, parameter_key, removed_on_exit
from ipg_lightning.model.sites import Site, discover_sites

_COMPONENT_NAME = re.compile(r"^(?P<site>.+?)(?:\[(?P<index>\d+)\])?$")


class ComponentGates(nn.Module):
    """One gate vector per :class:`~ipg_lightning.model.sites.Site`, applied through forward hooks.

    Args:
        sites: the sites to gate.
        init: initial value of every gate (1.0 leaves the model unchanged).
    """

    def __init__(self, sites: Sequence[Site], init: float = 1.0) -> None:
        super().__init__()
        names = [site.name for site in sites]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"Sites listed more than once: {duplicated}")
        _check_finite(torch.tensor(init), "init")
        self.sites: dict[str, Site] = {site.name: site for site in sites}
        self.values = nn.ParameterDict({parameter_key(site.name): nn.Parameter(torch.full((site.size,), float(init))) for site in sites})
        # The SAEs of sae_feature sites move with their gates (the model holds them off its module tree).
        self.saes = nn.ModuleDict({parameter_key(site.name): site.sae for site in sites if site.sae is not None})

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        families: Iterable[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
        architecture: ArchitectureSpec | None = None,
        init: float = 1.0,
    ) -> ComponentGates:
        """Discover the sites of ``families`` at ``layers`` in ``model`` and gate them."""
        return cls(discover_sites(model, families, layers, architecture), init=init)

    @property
    def num_components(self) -> int:
        """Total number of gates over all sites."""
        return sum(site.size for site in self.sites.values())

    def gate(self, site_name: str) -> nn.Parameter:
        """The gate vector of one site, by hook name (e.g. ``blocks.3.hook_resid_post``)."""
        if site_name not in self.sites:
            raise KeyError(f"No gated site {site_name!r}; gated sites: {list(self.sites)}")
        return self.values[parameter_key(site_name)]

    def component_names(self) -> list[str]:
        """Names of all components, in the order of :meth:`flat_values`."""
        return [site.component_name(i) for site in self.sites.values() for i in range(site.size)]

    def flat_values(self) -> torch.Tensor:
        """All gate values concatenated in site order (a view-free copy)."""
        return torch.cat([self.gate(name).detach() for name in self.sites])

    @torch.no_grad()
    def set_site(self, site_name: str, value: float | torch.Tensor) -> None:
        """Set every gate of one site to ``value`` (a scalar or a vector of the site's size)."""
        gate = self.gate(site_name)
        value = torch.as_tensor(value, dtype=gate.dtype)
        _check_finite(value, site_name)
        gate.copy_(value.expand_as(gate))

    @torch.no_grad()
    def set_component(self, component_name: str, value: float) -> None:
        """Set one gate by component name, e.g. ``blocks.3.attn.hook_z[2]``."""
        site_name, index = parse_component_name(component_name)
        _check_finite(torch.tensor(value), component_name)
        site = self.sites.get(site_name)
        if site is None:
            raise KeyError(f"No gated site {site_name!r} for component {component_name!r}")
        if index is None and site.size != 1:
            raise ValueError(f"{component_name!r} needs an index: {site_name} has {site.size} components")
        if index is not None and index >= site.size:
            raise ValueError(f"{component_name!r} is out of range: {site_name} has {site.size} components (0 to {site.size - 1}) in this model")
        self.gate(site_name)[index or 0] = value

    def component_value(self, component_name: str) -> float:
        """The gate value of one component by name, e.g. ``blocks.3.attn.hook_z[2]``."""
        site_name, index = parse_component_name(component_name)
        return float(self.gate(site_name)[index or 0].detach())

    def squared_deviation(self) -> torch.Tensor:
        """``sum (c_i - 1)^2`` over every gate: the penalty that keeps learned gates near the unsteered model."""
        return sum(((gate - 1) ** 2).sum() for gate in self.values.values())

    def check_finite(self, when: str) -> None:
        """Raise ``FloatingPointError`` naming the site if any gate is NaN or infinite (a diverged training run).

        Args:
            when: where the check runs, for the message (e.g. ``"at step 12"``).
        """
        for name in self.sites:
            if not torch.isfinite(self.gate(name)).all():
                raise FloatingPointError(
                    f"The gates of {name} became non-finite {when}: the training diverged; "
                    "lower learning_rate (or raise gate_penalty) and start again"
                )

    def set_components(self, values: Mapping[str, float]) -> None:
        """Set several gates by component name."""
        for name, value in values.items():
            self.set_component(name, value)

    @torch.no_grad()
    def reset(self, value: float = 1.0) -> None:
        """Set every gate of every site to ``value``."""
        for name in self.sites:
            self.set_site(name, value)

    def install(self, model: nn.Module) -> list[Handle]:
        """Install the gate hooks on ``model`` until the returned handles are removed.

        Prefer :meth:`attach`, which always removes them; this is for a steered model that keeps
        its gates for life (see :func:`ipg_lightning.gates.exported.load_steered`).
        """
        hooked = [site for site in self.sites.values() if not site.kind.scales_weight]
        return install_intervention(model, self, hooked, first=self._gate_expert_weights)

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[ComponentGates]:
        """Install the gate hooks on ``model`` (plain or PEFT-wrapped); always remove them on exit."""
        with removed_on_exit(self.install(model)):
            yield self

    def _gate_expert_weights(self, root: nn.Module) -> list[WeightGateHandle]:
        """Reparametrise fused expert weights (and biases) as weight x the product of their sites' gate factors."""
        groups: dict[tuple[str, str], list[Site]] = {}
        for site in self.sites.values():
            if site.kind.scales_weight:
                groups.setdefault((site.module_path, site.parameter), []).append(site)
                if site.bias is not None:
                    groups.setdefault((site.module_path, site.bias), []).append(site)
        handles = []
        for (path, name), sites in groups.items():
            module = root.get_submodule(path)
            shape = getattr(module, name).shape

            def multiplier(sites: list[Site] = sites, shape: torch.Size = shape) -> torch.Tensor:
                factor = torch.ones((), device=self.gate(sites[0].name).device)
                for site in sites:
                    factor = factor * site.weight_multiplier(shape, self.gate(site.name))
                return factor

            handles.append(gate_weight(module, name, multiplier))
        return handles

    def edit(self, site: Site, activation: torch.Tensor) -> torch.Tensor:
        """``site``'s ``activation`` scaled by this set's gates of that site (what the installed hook applies)."""
        return site.edit(activation, self.gate(site.name))


def combined_gates(*gate_sets: ComponentGates | None) -> ComponentGates:
    """One gate set equal to applying all of ``gate_sets`` (the union of their sites, gates multiplied).

    Gates act multiplicatively on the same activation, so steering a model that is already steered
    composes exactly. ``None`` entries are skipped.
    """
    sites: dict[str, Site] = {}
    for gates in filter(None, gate_sets):
        for name, site in gates.sites.items():
            if sites.setdefault(name, site) != site:
                raise ValueError(f"Cannot combine gates: {name} is {sites[name]} in one set and {site} in another")
            if not same_sae(sites[name].sae, site.sae):
                raise ValueError(
                    f"Cannot combine gates: {name} holds a different SAE in each set; gates on features of different SAEs do not compose"
                )
    combined = ComponentGates(list(sites.values()))
    for gates in filter(None, gate_sets):
        for name in gates.sites:
            current = combined.gate(name).detach()
            combined.set_site(name, current * gates.gate(name).detach().to(current.device))
    return combined


def parse_component_name(component_name: str) -> tuple[str, int | None]:
    """Split ``blocks.3.attn.hook_z[2]`` into ``("blocks.3.attn.hook_z", 2)``.

    >>> parse_component_name("blocks.0.hook_mlp_out")
    ('blocks.0.hook_mlp_out', None)
    """
    match = _COMPONENT_NAME.match(component_name)
    if match is None:
        raise ValueError(f"Malformed component name {component_name!r}")
    index = match["index"]
    return match["site"], None if index is None else int(index)


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        bad = value[~torch.isfinite(value)].flatten()[0].item()
        raise ValueError(f"Gate value for {what} must be finite, got {bad}")
