"""The data an explorer page embeds: the report's ranking, the traced components, their trajectories, measured effects.

Everything the page shows is in one JSON object built here, so tests can compare it with the report
and with the model directly. Its size is bounded by how many components are listed and traced and
how many trajectories each one shows; ``limits`` says what was left out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ipg_lightning.attribution.report import AttributionReport
from ipg_lightning.explorer.traces import ComponentTrace
from ipg_lightning.explorer.vector_traces import VectorTrace
from ipg_lightning.model.identity import ModelMismatchError, check_same_identity, same_model_name
from ipg_lightning.steering.loading import SteeringDescription
from ipg_lightning.task import plain

logger = logging.getLogger(__name__)

#: Settings of the run the page's header shows, when the report's config has them.
SHOWN_SETTINGS = (
    *("reward", "families", "layers", "steps", "rule", "baseline", "estimation", "path", "credit", "advantage"),
    *("signal_retries", "surrogate"),
)


@dataclass
class MeasuredEffect:
    """A measured condition: the components it gated, at which value, and its metrics (from ``ipg evaluate`` or the demo).

    Args:
        label: how the page names it, e.g. ``length suppressed``.
        gamma: the gate value of its components (None for learned gates).
        components: the gated components.
        metrics: accuracy, answer rate, reasoning length, reflection rate, ...
    """

    label: str
    gamma: float | None
    components: list[str]
    metrics: dict[str, Any]


@dataclass
class Effects:
    """The base model's metrics and the measured conditions, for the page's "effect of steering" table."""

    base: dict[str, Any] | None = None
    conditions: list[MeasuredEffect] = field(default_factory=list)


def read_evaluations(
    directories: list[str | Path], identity: dict[str, Any] | None = None, report: str = "The report", allow_other_model: bool = False
) -> Effects:
    """Effects from ``ipg evaluate`` output directories (their ``metrics.json``): one base run and fixed steering runs.

    Learned-gate, exported and sweep outputs carry no single gamma per component and are refused by
    name. With the report's model ``identity``, an evaluation of another model (another architecture,
    or another name) is refused unless ``allow_other_model``, which shows it with a warning; one that
    records no identity is named in a warning as unchecked.
    """
    effects = Effects()
    for directory in directories:
        path = Path(directory) / "metrics.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            _check_evaluation(summary)
            steering, metrics = SteeringDescription.from_json(summary["steering"]), summary["metrics"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{directory} is not an `ipg evaluate` output ({path.name}: {type(error).__name__}: {error})") from None
        _check_evaluated_model(summary.get("model_identity"), identity, directory, report, allow_other_model)
        if steering.kind == "base":
            if effects.base is not None:
                raise ValueError(f"Two evaluations of the base model were given ({directory} is the second): give one")
            effects.base = metrics
        elif steering.vectors is not None:
            raise ValueError(
                f"{directory} evaluates a model with steering vectors added; the explorer shows gates alone (fixed steering) and the base model"
            )
        elif steering.kind == "fixed":
            label = f"{len(steering.components)} components at gamma {steering.gamma:g} ({Path(directory).name})"
            effects.conditions.append(MeasuredEffect(label, float(steering.gamma), list(steering.components), metrics))
        else:
            raise ValueError(
                f"{directory} evaluates a {steering.kind} model; the explorer shows fixed steering (a selection at a gamma) and the base model"
            )
    return effects


#: Metrics that are shares of the completions, in [0, 1] (and ``avg@k``, ``pass@k`` with k samples per problem).
RATES = ("accuracy", "answer_rate", "reflection_rate")
RATE_PREFIXES = ("avg@", "pass@")


def _check_evaluation(summary: dict[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first entry of a ``metrics.json`` that ``ipg evaluate`` could not have written."""
    steering, metrics = summary["steering"], summary["metrics"]
    if not (isinstance(steering, dict) and isinstance(metrics, dict) and isinstance(summary.get("model_identity", {}), dict)):
        raise TypeError("steering, metrics and model_identity must be objects")
    for key, value in metrics.items():
        if value is None:  # a metric with nothing to measure (written as null)
            continue
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
            raise ValueError(f"metric {key} is {value!r}, not a number >= 0")
        if (key in RATES or key.startswith(RATE_PREFIXES)) and value > 1:
            raise ValueError(f"metric {key} is {value}, but it is a share of the completions (0 to 1)")
    if steering.get("kind") == "fixed":
        components, gamma = steering.get("components"), steering.get("gamma")
        if not (isinstance(components, list) and components and all(isinstance(name, str) for name in components)):
            raise ValueError("steering.components must be a list of component names")
        if not (isinstance(gamma, int | float) and not isinstance(gamma, bool) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"steering.gamma is {gamma!r}, not a gate value >= 0")


def _check_evaluated_model(evaluated: Any, identity: dict[str, Any] | None, directory: str | Path, report: str, allow_other_model: bool) -> None:
    """An evaluation must be of the report's model: its architecture (refused otherwise) and, by name, its weights."""
    if identity is None:
        return
    if not isinstance(evaluated, dict):
        logger.warning("The evaluation %s records no model identity (an older version wrote it): it cannot be checked", directory)
        return
    check_same_identity(identity, evaluated, report, allow_other_model, target=f"the model of the evaluation {directory}")
    if same_model_name(evaluated.get("name"), identity.get("name")):
        return
    message = f"The evaluation {directory} measured {evaluated.get('name')}, but the report was computed on {identity.get('name')}"
    if not allow_other_model:
        raise ModelMismatchError(f"{message}: its metrics are not the effect of steering the report's model; give evaluations of that model")
    logger.warning("%s; showing its metrics because allow_other_model is set", message)


def _rounded(value: Any) -> Any:
    """Floats to 5 significant digits (recursively), to keep the page small; non-finite floats become None."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else None
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int], context: int = 3) -> list[str]:
    """Each token as the text it adds after the ``context`` tokens before it (so a SentencePiece word keeps
    its leading space); decoded alone where the tokenizer rewrites the context (a split byte shows as U+FFFD)."""
    pieces = []
    for index, token in enumerate(ids):
        before = tokenizer.decode(ids[max(0, index - context) : index])
        both = tokenizer.decode(ids[max(0, index - context) : index + 1])
        pieces.append(both[len(before) :] if both.startswith(before) else tokenizer.decode([token]))
    return pieces


def explorer_payload(
    report: AttributionReport,
    traces: dict[str, ComponentTrace],
    tokenizer: PreTrainedTokenizerBase,
    effects: Effects | None = None,
    max_listed: int = 5000,
    title: str | None = None,
    notes: list[str] | None = None,
    vectors: dict[str, VectorTrace] | None = None,
) -> dict[str, Any]:
    """The page's data: settings and counts, the ranking (at most ``max_listed`` by |score|), the traces and what they show.

    Args:
        report: the attribution report (with its kept trajectories).
        traces: the traced components (:func:`~ipg_lightning.explorer.traces.trace_components`).
        tokenizer: the model's tokenizer, to show tokens.
        effects: measured steering effects, if any.
        max_listed: how many components the ranking lists at least (the highest by |score|; the traced ones are always listed).
        title: the page's title (default: the method and reward).
        notes: what the page should say it left out or could not compute.
        vectors: steering vectors projected on the trajectories (:func:`~ipg_lightning.explorer.vector_traces.trace_vectors`), if any.
    """
    kept = report.trajectories
    meta = report.metadata
    config = meta.config
    ranked = report.ranked(signed=True)
    kept_names = {name for name, _, _ in sorted(ranked, key=lambda row: abs(row[1]), reverse=True)[:max_listed]} | set(traces)
    sites = list(report.sites)
    components = [[name, sites.index(site), rank + 1, score] for rank, (name, score, site) in enumerate(ranked) if name in kept_names]
    vectors = vectors or {}
    shown_rows = sorted({row for trace in [*traces.values(), *vectors.values()] for row in trace.rows})
    trajectories = {}
    for row in shown_rows:
        record = kept.rows[row]
        trajectories[str(row)] = {
            "prompt": record["prompt"],
            "sample": record["sample"],
            "tokens": token_strings(tokenizer, record["completion_ids"]),
            "reward": record["reward"],
            "advantage": record["advantage"],
            "correct": record["correct"],
            "reasoning_tokens": record["reasoning_tokens"],
        }
    prompts = {str(p): kept.prompts[p]["text"] for p in sorted({trajectories[str(row)]["prompt"] for row in shown_rows})}
    limits = {
        "components_total": len(ranked),
        "components_listed": len(components),
        "components_traced": len(traces),
        "trajectories_total": len(kept),
        "trajectories_shown": len(shown_rows),
        "rows_per_component": max((len(trace.rows) for trace in traces.values()), default=0),
        "notes": list(notes or []),
    }
    if len(components) < len(ranked):
        listed = f"The ranking lists {len(components)} of the {len(ranked)} components"
        limits["notes"].append(f"{listed}: those with the largest |score|, and the traced ones.")
    if len(traces) < len(components):
        limits["notes"].append(f"Traces are shown for {len(traces)} of the {len(components)} listed components (marked with a dot).")
    payload = {
        "title": title or f"{meta.method or '?'} attribution of {config.get('reward', '?')}",
        "meta": {
            "method": meta.method,
            "model": meta.model,
            "settings": {key: config[key] for key in SHOWN_SETTINGS if key in config},
            "sampling": config.get("sampling"),
            "effective": plain(meta.effective),
            "counts": plain(meta.counts),
            "mean_reward": meta.mean_reward,
            "wall_time_s": meta.wall_time_s,
            "completeness": plain(meta.completeness),
        },
        "sites": [{"name": name, **report.sites[name]} for name in sites],
        "components": components,
        "traces": {name: vars(trace) for name, trace in traces.items()},
        "vectors": {name: vars(trace) for name, trace in vectors.items()},
        # every kept trajectory's length and verdict, for the vectors' scatter of mean projection against length
        "kept": {key: [row[key] for row in kept.rows] for key in ("reasoning_tokens", "correct")} if vectors else None,
        "trajectories": trajectories,
        "prompts": prompts,
        "effects": {
            "base": effects.base if effects else None,
            "conditions": [vars(condition) for condition in effects.conditions] if effects else [],
        },
        "limits": limits,
    }
    return _rounded(payload)
