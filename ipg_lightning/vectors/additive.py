"""Additive steering vectors: ``h <- h + alpha * v`` at residual-stream and sub-layer sites.

The additive sibling of :class:`~ipg_lightning.gates.component_gates.ComponentGates` and the
baseline users compare gates with (activation addition, contrastive activation addition, SEAL-style
reasoning vectors, SAE decoder directions). A vector lives at a site whose activation is a
``hidden_size`` vector: a block's output (``resid_post``) or what an attention or MLP sub-layer adds
to it (``attn_out``, ``mlp_out``). It is added at every position, prompt and generated tokens alike,
or with ``positions="generated"`` at generated tokens only (:mod:`ipg_lightning.model.positions`),
in plain forward passes and in ``generate`` with a KV cache, through the same hooks gates use, so it
works on plain and PEFT-wrapped models, acts inside the vLLM engine (mirrored like gates; every
position only) and
composes with gates: edits on one site apply in the order their sets were installed.

Example:
    >>> from ipg_lightning.zoo.tiny import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> vectors = SteeringVectors.for_model(model, families=["resid_post"], layers=[1])
    >>> direction = torch.zeros(vectors.width)
    >>> direction[0] = 2.0
    >>> vectors.set_vector("blocks.1.hook_resid_post", direction)
    >>> vectors.alpha = 4.0
    >>> with vectors.attach(model):
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    >>> vectors.norms()
    {'blocks.1.hook_resid_post': 8.0}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch import nn

from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.interventions import Handle, install_intervention, parameter_key, removed_on_exit
from ipg_lightning.model.positions import declared_completion_mask, is_decode_step
from ipg_lightning.model.sites import Site, discover_sites, unwrap_model

#: The site families whose activation is a ``hidden_size`` vector a steering vector can be added to.
VECTOR_FAMILIES = ("resid_post", "attn_out", "mlp_out")
#: Where a vector is added: at every position, or at generated tokens only.
VectorPositions = Literal["all", "generated"]
POSITIONS: tuple[str, ...] = get_args(VectorPositions)


class SteeringVectors(nn.Module):
    """One additive vector per site, scaled by one strength ``alpha`` and added through forward hooks.

    Args:
        sites: the sites to steer (families in :data:`VECTOR_FAMILIES`).
        width: the model's ``hidden_size``, the length of every vector.
        alpha: the strength every vector is multiplied by (0 leaves the model unchanged).
        provenance: where the vectors come from (JSON-able: source, contrast, data, protocol), saved with them.
        positions: ``all`` (every position) or ``generated`` (generated tokens only: each decode step of
            ``generate``, and the completion positions a teacher-forced pass declares; not in the vLLM engine).
    """

    def __init__(
        self,
        sites: Sequence[Site],
        width: int,
        alpha: float = 1.0,
        provenance: Mapping[str, Any] | None = None,
        positions: VectorPositions = "all",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
        if not sites:
            raise ValueError(f"SteeringVectors needs at least one site (families {list(VECTOR_FAMILIES)})")
        wrong = [site.name for site in sites if site.family not in VECTOR_FAMILIES or site.sae is not None]
        if wrong:
            raise ValueError(f"Steering vectors are added at {list(VECTOR_FAMILIES)} sites only, got {wrong}")
        names = [site.name for site in sites]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"Sites listed more than once: {duplicated}")
        if width < 1:
            raise ValueError(f"width must be the model's hidden_size (at least 1), got {width}")
        self.sites: dict[str, Site] = {site.name: site for site in sites}
        self.width = int(width)
        self.vectors = nn.ParameterDict({parameter_key(site.name): nn.Parameter(torch.zeros(self.width)) for site in sites})
        self._alpha = 1.0
        self.alpha = alpha
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.positions: VectorPositions = positions
        self._decoding = False  # set before each forward of the model it is attached to (positions "generated")

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        families: Iterable[str] = ("resid_post",),
        layers: Sequence[int] | None = None,
        architecture: ArchitectureSpec | None = None,
        alpha: float = 1.0,
        provenance: Mapping[str, Any] | None = None,
        positions: VectorPositions = "all",
    ) -> SteeringVectors:
        """Zero vectors at the sites of ``families`` at ``layers`` of ``model`` (plain or PEFT-wrapped)."""
        families = list(families)
        wrong = [family for family in families if family not in VECTOR_FAMILIES]
        if wrong:
            raise ValueError(f"Steering vectors are added at {list(VECTOR_FAMILIES)} sites only, got families {wrong}")
        width = unwrap_model(model).config.hidden_size
        return cls(discover_sites(model, families, layers, architecture), width, alpha=alpha, provenance=provenance, positions=positions)

    @property
    def alpha(self) -> float:
        """The strength every vector is multiplied by before it is added."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"alpha must be a finite number, got {value}")
        self._alpha = float(value)

    def vector(self, site_name: str) -> nn.Parameter:
        """The vector of one site, by hook name (e.g. ``blocks.3.hook_resid_post``)."""
        if site_name not in self.sites:
            raise KeyError(f"No steering vector at {site_name!r}; steered sites: {list(self.sites)}")
        return self.vectors[parameter_key(site_name)]

    @torch.no_grad()
    def set_vector(self, site_name: str, value: torch.Tensor) -> None:
        """Set the vector of one site to ``value`` (a tensor of :attr:`width` finite numbers)."""
        vector = self.vector(site_name)
        value = torch.as_tensor(value).detach()
        if value.shape != vector.shape:
            raise ValueError(f"The vector for {site_name} must have shape ({self.width},) (the model's hidden_size), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"The vector for {site_name} has non-finite values")
        vector.copy_(value.to(vector.dtype))

    def norms(self) -> dict[str, float]:
        """The L2 norm of what each site gets added: ``|alpha * v|``."""
        return {name: abs(self.alpha) * float(self.vector(name).detach().norm()) for name in self.sites}

    def check_finite(self, when: str) -> None:
        """Raise ``FloatingPointError`` naming the site if a vector is NaN or infinite (a diverged training run)."""
        for name in self.sites:
            if not torch.isfinite(self.vector(name)).all():
                raise FloatingPointError(
                    f"The steering vector at {name} became non-finite {when}: the training diverged; "
                    "lower learning_rate (or set max_norm) and start again"
                )

    @torch.no_grad()
    def clamp_norms(self, max_norm: float) -> None:
        """Scale down every vector whose norm exceeds ``max_norm`` to that norm (the projection step of norm-bounded training)."""
        for name in self.sites:
            vector = self.vector(name)
            norm = float(vector.norm())
            if norm > max_norm:
                vector.mul_(max_norm / norm)

    def edit(self, site: Site, activation: torch.Tensor) -> torch.Tensor:
        """``site``'s ``activation`` (rows, positions, width) plus ``alpha`` times its vector, at every position
        or at generated ones only (what the installed hook applies)."""
        if self.alpha == 0:
            return activation
        added = (self.alpha * self.vector(site.name).to(device=activation.device, dtype=torch.float32)).to(activation.dtype)  # rounded once
        if self.positions == "all" or self._decoding:
            return activation + added
        mask = declared_completion_mask()
        if mask is None or tuple(mask.shape) != tuple(activation.shape[:2]):  # a prompt's prefill, or a pass that declares no generated tokens
            return activation
        return activation + added * mask.to(device=activation.device, dtype=activation.dtype)[..., None]

    def install(self, model: nn.Module) -> list[Handle]:
        """Install the vector hooks on ``model`` until the returned handles are removed (prefer :meth:`attach`)."""
        first = self._watch_decoding if self.positions == "generated" else None
        return install_intervention(model, self, self.sites.values(), first=first)

    def _watch_decoding(self, root: nn.Module) -> list[Handle]:
        """Before each forward of ``root``, note whether it is a decode step of ``generate`` (which adds everywhere)."""

        def note(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._decoding = is_decode_step(kwargs)

        return [root.register_forward_pre_hook(note, with_kwargs=True)]

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[SteeringVectors]:
        """Install the vector hooks on ``model`` (plain or PEFT-wrapped); always remove them on exit."""
        with removed_on_exit(self.install(model)):
            yield self
