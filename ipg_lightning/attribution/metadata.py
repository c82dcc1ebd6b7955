"""What an attribution report records beside its scores, as typed objects.

:class:`ReportMetadata` is written to ``attribution.json`` by :meth:`ReportMetadata.to_json` and read
back by :meth:`ReportMetadata.from_json`; readers (the explorer, steering, the demo, benchmarks) use
its attributes, never ``.get()`` chains on a dict. The run's settings stay a plain mapping
(``config``: the module's hyperparameters, as LightningCLI wrote them) and so does the memory record.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

log = logging.getLogger(__name__)

#: The entry of ``attribution.json`` holding the SHA-256 of ``trajectories.json``.
TRAJECTORIES_DIGEST = "trajectories_sha256"


@dataclass(frozen=True)
class ReportCounts:
    """How much the attribution saw: prompts, trajectories, tokens, and the groups it skipped or redrew."""

    prompts: int = 0
    trajectories: int = 0
    completion_tokens: int = 0
    #: Prompts whose N rewards were all equal (skipped); None for methods that do not skip.
    zero_signal_prompts: int | None = None
    #: Trajectories above their prompt's mean reward (``mean_diff``); None for the other methods.
    above_mean_trajectories: int | None = None
    redrawn_groups: int = 0
    redrawn_tokens: int = 0


@dataclass(frozen=True)
class Completeness:
    """The per-prompt sum of scores against the change of the surrogate it should equal (IPG's completeness)."""

    sum_of_scores: float
    target: str
    surrogate_delta: float
    residual: float
    relative_residual: float
    note: str

    @classmethod
    def from_state(cls, state: dict[str, Any], target: str, local_credit: bool = False) -> Completeness:
        """The block of a reduced attribution state (``prompts``, ``score_sum``, ``surrogate_delta``).

        >>> Completeness.from_state({"prompts": 2.0, "score_sum": 3.0, "surrogate_delta": 2.0}, "L(1) - L(0)").residual
        0.5
        """
        prompts = max(state["prompts"], 1.0)
        total, delta = state["score_sum"] / prompts, state["surrogate_delta"] / prompts
        note = "per-prompt means; sum over all paths"
        if local_credit:
            note += "; credit: local scores are not the gradient of L, so they need not add up to it"
        relative = abs(total - delta) / max(abs(delta), 1e-12)
        return cls(sum_of_scores=total, target=target, surrogate_delta=delta, residual=total - delta, relative_residual=relative, note=note)


@dataclass(frozen=True)
class Quadrature:
    """The quadrature a method actually used (``grad_x_act`` uses one right point whatever it was given)."""

    steps: int
    rule: str


@dataclass
class ReportMetadata:
    """Everything a report records about how its scores came to be.

    Args:
        method: the attribution method (``ipg``, ``grad_x_act``, ...).
        config: the run's settings (the module's hyperparameters, with the reward's name).
        effective: the quadrature actually used.
        model: the model's path or alias.
        model_identity: the model's identity (:func:`~ipg_lightning.model.identity.model_identity`).
        data: the data source, split and seed.
        counts: prompts, trajectories, tokens, skipped and redrawn groups.
        mean_reward: the mean reward at gates = 1 (None if nothing was sampled).
        wall_time_s: the run's wall time.
        memory: the peak memory and the bounds the run chose.
        world_size: processes the run was split over.
        saes: per ``sae_feature`` site, where its SAE was loaded from.
        sampling: how the trajectories were sampled: engine, settings, what holds for their seeds
            (:func:`~ipg_lightning.rollout.sampling.sampling_record`).
        protocol: the full protocol: decoding, prompt, ``<think>`` handling and the grader the
            reward's accuracy used (:func:`~ipg_lightning.evaluation.protocols.protocol_record`).
        completeness: the completeness check, for methods that have one.
        degenerate: why the scores carry no information, if they do not.
        trajectories_sha256: the digest of the kept trajectories' file, if the run kept them.
    """

    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    effective: Quadrature | None = None
    model: str | None = None
    model_identity: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    counts: ReportCounts | None = None
    mean_reward: float | None = None
    wall_time_s: float | None = None
    memory: dict[str, Any] | None = None
    world_size: int = 1
    saes: dict[str, str] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    completeness: Completeness | None = None
    degenerate: str | None = None
    trajectories_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; entries that are unset (None or empty) are left out."""
        return {key: value for key, value in asdict(self).items() if value not in (None, {})}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ReportMetadata:
        """Read what :meth:`to_json` wrote. Entries this version does not know (another version wrote them)
        are left out with a warning; a block missing an entry it needs raises ``ValueError``."""
        values = _known(cls, payload, "the report")
        try:
            for key, kind in (("counts", ReportCounts), ("completeness", Completeness), ("effective", Quadrature)):
                if isinstance(values.get(key), dict):
                    values[key] = kind(**_known(kind, values[key], f"the report's {key}"))
        except TypeError as error:
            raise ValueError(f"a block lacks an entry ({error})") from None
        return cls(**values)


def _known(kind: type, entries: dict[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``entries`` that are fields of the dataclass ``kind``; the others are named in a warning."""
    known = {entry.name for entry in fields(kind)}
    unknown = sorted(set(entries) - known)
    if unknown:
        log.warning("%s has entries this version does not read, left out: %s", where, unknown)
    return {key: value for key, value in entries.items() if key in known}
