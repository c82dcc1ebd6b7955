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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ipg_lightning.completions import completions_of
from ipg_lightning.data import ReasoningBatch
from ipg_lightning.outputs import strict_json
from ipg_lightning.rewards import accuracy, reasoning_length
from ipg_lightning.trajectories import Trajectories

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
        """The kept rows (all by default) as :class:`~ipg_lightning.trajectories.Trajectories` to replay."""
        chosen = [self.rows[r] for r in (range(len(self.rows)) if rows is None else rows)]
        return Trajectories(
            prompt_ids=[self.prompts[row["prompt"]]["prompt_ids"] for row in chosen],
            completion_ids=[row["completion_ids"] for row in chosen],
            completions=[row["completion"] for row in chosen],
            prompt_index=[row["prompt"] for row in chosen],
            sample_index=[row["sample"] for row in chosen],
            pad_token_id=self.pad_token_id,
        )

    def save(self, path: str | Path) -> None:
        """Write ``trajectories.json`` (the caller makes it atomic)."""
        payload = {"format": FORMAT_VERSION, "num_samples": self.num_samples, "pad_token_id": self.pad_token_id}
        Path(path).write_text(strict_json({**payload, "prompts": self.prompts, "rows": self.rows}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> KeptTrajectories:
        """Read ``trajectories.json``; a damaged or foreign file raises ``ValueError`` naming it."""
        path = Path(path)
        damaged = f"{path} is damaged or was not written by ipg_lightning"
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{damaged} ({type(error).__name__}: {error}); run the attribution again") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{damaged}: expected format {FORMAT_VERSION}; run the attribution again")
        try:
            kept = cls(int(payload["num_samples"]), int(payload["pad_token_id"]), list(payload["prompts"]), list(payload["rows"]))
            if kept.num_samples < 1:
                raise ValueError(f"num_samples is {kept.num_samples}")
            for prompt in kept.prompts:
                if not isinstance(prompt["text"], str) or not _token_ids(prompt["prompt_ids"]):
                    raise ValueError("a prompt's text is not text or its prompt_ids are not token ids")
            for row in kept.rows:
                if not set(row) >= _ROW_KEYS or not isinstance(row["prompt"], int) or not 0 <= row["prompt"] < len(kept.prompts):
                    raise ValueError(f"a trajectory lacks {sorted(_ROW_KEYS - set(row))} or names no kept prompt")
                if not _token_ids(row["completion_ids"]):
                    raise ValueError("a trajectory's completion_ids are not token ids")
                if not isinstance(row["reasoning_tokens"], int) or not isinstance(row["reward"], int | float):
                    raise ValueError("a trajectory's reasoning_tokens or reward is not a number")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{damaged} ({error}); run the attribution again") from None
        return kept


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
