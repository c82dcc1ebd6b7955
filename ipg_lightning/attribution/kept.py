"""The trajectories an attribution run sampled, kept with the report so they can be looked at again.

With ``keep_trajectories: true`` a run that samples (``ipg``, ``grad_x_act``, ``activation``,
``mean_diff``) records every trajectory it scored: the prompt, the generated token ids and text, the
reward, the group advantage the policy gradient weighted it by (``ipg`` and ``grad_x_act``), whether
its final answer was right, and how many of its tokens were reasoning. The report writes them to
``trajectories.json``; the explorer (:mod:`ipg_lightning.explorer`) replays them through the model
instead of sampling again. With fixed estimation they are the trajectories the scores came from;
with ``estimation: resample`` they are the samples at gates = 1 (each quadrature point drew its own).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ipg_lightning.data import ReasoningBatch
from ipg_lightning.outputs import strict_json
from ipg_lightning.rewards.completions import completions_of
from ipg_lightning.rewards.functions import accuracy, reasoning_length
from ipg_lightning.rollout.trajectories import Trajectories

TRAJECTORIES_FILE = "trajectories.json"
FORMAT_VERSION = 1
_ROW_KEYS = {"prompt", "sample", "completion_ids", "completion", "reward", "advantage", "correct", "reasoning_tokens"}


@dataclass
class KeptTrajectories:
    """Every trajectory of an attribution run, grouped by prompt.

    Args:
        num_samples: trajectories per prompt (N).
        pad_token_id: the padding id the trajectories were sampled with, to replay them as a batch
            (set by :meth:`add`).
        prompts: per prompt, ``text`` (as the model saw it), ``prompt_ids`` and ``answer`` (or None).
        rows: per trajectory, ``prompt`` (index into ``prompts``), ``sample``, ``completion_ids``,
            ``completion``, ``reward``, ``advantage`` (None for methods without one), ``correct``
            (None where the problem has no gold answer) and ``reasoning_tokens``.
    """

    num_samples: int
    pad_token_id: int = 0
    prompts: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        batch: ReasoningBatch,
        trajectories: Trajectories,
        rewards: torch.Tensor,
        advantages: torch.Tensor | None,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        """Record the trajectories of one batch (ordered by prompt, N per prompt) with their rewards and advantages."""
        first = len(self.prompts)
        self.pad_token_id = trajectories.pad_token_id
        for index, prompt in enumerate(batch["prompt"]):
            prompt_ids = trajectories.prompt_ids[trajectories.prompt_index.index(index)]
            self.prompts.append({"text": prompt, "prompt_ids": list(prompt_ids), "answer": batch["answer"][index]})
        completions = completions_of(trajectories, batch["prompt"], batch["answer"], tokenizer)
        flat_rewards = rewards.flatten().tolist()
        flat_advantages = advantages.flatten().tolist() if advantages is not None else [None] * len(trajectories)
        for row, completion in enumerate(completions):
            self.rows.append(
                {
                    "prompt": first + trajectories.prompt_index[row],
                    "sample": trajectories.sample_index[row],
                    "completion_ids": list(trajectories.completion_ids[row]),
                    "completion": trajectories.completions[row],
                    "reward": flat_rewards[row],
                    "advantage": flat_advantages[row],
                    "correct": None if completion.gold is None else bool(accuracy(completion)),
                    "reasoning_tokens": int(reasoning_length(completion)),
                }
            )

    def extend(self, other: KeptTrajectories) -> None:
        """Append another set (e.g. another process's), renumbering its prompts after these."""
        offset = len(self.prompts)
        self.prompts += other.prompts
        self.rows += [{**row, "prompt": row["prompt"] + offset} for row in other.rows]

    def trajectories(self, rows: list[int] | None = None) -> Trajectories:
        """The kept rows (all by default) as :class:`~ipg_lightning.rollout.trajectories.Trajectories` to replay."""
        chosen = [self.rows[r] for r in (range(len(self.rows)) if rows is None else rows)]
        return Trajectories(
            prompt_ids=[self.prompts[row["prompt"]]["prompt_ids"] for row in chosen],
            completion_ids=[row["completion_ids"] for row in chosen],
            completions=[row["completion"] for row in chosen],
            prompt_index=[row["prompt"] for row in chosen],
            sample_index=[row["sample"] for row in chosen],
            pad_token_id=self.pad_token_id,
        )

    def check_replayable(self, vocab_size: int, max_positions: int | None) -> None:
        """Raise ``ValueError`` naming the first trajectory that a model with ``vocab_size`` tokens and a context
        of ``max_positions`` cannot replay (a token id it has no embedding for, or more tokens than its context)."""
        if not self.rows:
            raise ValueError("The report kept no trajectories to replay (its trajectories.json has no rows); run the attribution again")
        if not 0 <= self.pad_token_id < vocab_size:
            raise ValueError(f"The kept trajectories pad with token {self.pad_token_id}, which the model (vocabulary {vocab_size}) does not have")
        for index, row in enumerate(self.rows):
            ids = self.prompts[row["prompt"]]["prompt_ids"] + row["completion_ids"]
            if max(ids, default=0) >= vocab_size:
                raise ValueError(f"Kept trajectory {index} has token id {max(ids)}, but the model's vocabulary has {vocab_size} tokens")
            if max_positions is not None and len(ids) > max_positions:
                raise ValueError(f"Kept trajectory {index} is {len(ids)} tokens long, longer than the model's context of {max_positions}")

    def save(self, path: str | Path) -> str:
        """Write ``trajectories.json`` (the caller makes it atomic); return the SHA-256 of what was written, for the report to record."""
        payload = {"format": FORMAT_VERSION, "num_samples": self.num_samples, "pad_token_id": self.pad_token_id}
        data = strict_json({**payload, "prompts": self.prompts, "rows": self.rows}).encode("utf-8")
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> KeptTrajectories:
        """Read ``trajectories.json``; a damaged or foreign file, or one whose digest is not the ``sha256`` its
        report recorded (it was edited since), raises ``ValueError`` naming it."""
        path = Path(path)
        damaged = f"{path} is damaged or was not written by ipg_lightning"
        try:
            data = path.read_bytes()
            payload = json.loads(data)
        except (OSError, ValueError) as error:
            raise ValueError(f"{damaged} ({type(error).__name__}: {error}); run the attribution again") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(
                f"{path} was changed after its report was written (its SHA-256 is not the one the report records): the report's "
                "scores did not come from these trajectories; run the attribution again"
            )
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{damaged}: expected format {FORMAT_VERSION}; run the attribution again")
        try:
            if not (_whole(payload["num_samples"], 1) and _whole(payload["pad_token_id"], 0)):
                raise ValueError("num_samples or pad_token_id is not a whole number")
            kept = cls(payload["num_samples"], payload["pad_token_id"], list(payload["prompts"]), list(payload["rows"]))
            _check_contents(kept)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{damaged} ({error}); run the attribution again") from None
        return kept


def _check_contents(kept: KeptTrajectories) -> None:
    """Raise ``ValueError`` naming the first entry of ``kept`` that a run could not have written."""
    for prompt in kept.prompts:
        if not isinstance(prompt["text"], str) or not _token_ids(prompt["prompt_ids"]) or not prompt["prompt_ids"]:
            raise ValueError("a prompt's text is not text or its prompt_ids are not token ids")
    for row in kept.rows:
        if not set(row) >= _ROW_KEYS or not isinstance(row["prompt"], int) or not 0 <= row["prompt"] < len(kept.prompts):
            raise ValueError(f"a trajectory lacks {sorted(_ROW_KEYS - set(row))} or names no kept prompt")
        if not _token_ids(row["completion_ids"]) or not row["completion_ids"]:  # generation yields at least one token
            raise ValueError("a trajectory's completion_ids are not token ids, or none")
        if not _whole(row["reasoning_tokens"], 0) or not _number(row["reward"]) or not _number(row["advantage"], none=True):
            raise ValueError("a trajectory's reasoning_tokens, reward or advantage is not a number")
        if not (_whole(row["sample"], 0) and row["sample"] < kept.num_samples) or not (row["correct"] is None or isinstance(row["correct"], bool)):
            raise ValueError("a trajectory's sample is not one of its prompt's samples, or its correct is not true, false or null")
    per_prompt = Counter(row["prompt"] for row in kept.rows)
    if any(per_prompt[index] != kept.num_samples for index in range(len(kept.prompts))):
        raise ValueError(f"not every prompt has its num_samples = {kept.num_samples} trajectories")


def _whole(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value: Any, none: bool = False) -> bool:
    """Whether ``value`` is a finite number (not a bool), or None where ``none`` allows it."""
    if value is None:
        return none
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _token_ids(values: Any) -> bool:
    """Whether ``values`` is a list of non-negative integers (token ids)."""
    return isinstance(values, list) and all(isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in values)


def gathered(kept: KeptTrajectories) -> KeptTrajectories:
    """Every process's kept trajectories, in rank order (the set itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return kept
    parts: list[KeptTrajectories | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, kept)
    merged = KeptTrajectories(kept.num_samples, kept.pad_token_id)
    for part in parts:
        merged.extend(part)
    return merged
