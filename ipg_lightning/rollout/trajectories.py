"""Trajectories: prompts with their sampled (or given) completions, and how they are sampled.

:class:`Trajectories` holds token ids and texts of completions, one row per completion, and pads them
for a teacher-forced pass; :class:`SamplingConfig` says how completions are sampled
(:mod:`~ipg_lightning.rollout.sampling`); :func:`teacher_forced_trajectories` makes rows from given texts.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ipg_lightning.model.sites import unwrap_model
from ipg_lightning.rollout.engine_names import Engine
from ipg_lightning.rollout.seeds import row_seed


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM engine is started (``engine: vllm``); read only when that engine samples.

    Args:
        enforce_eager: run the model eagerly. Gates are hooks on the engine's modules, and a compiled
            engine never calls hooks placed after start-up, so gated sampling needs ``True``; the probe
            before every gated call refuses an engine whose hooks do not fire.
        gpu_memory_utilization: the fraction of the GPU the engine may take, weights and KV cache
            (it shares the device with the Hugging Face model that scores and trains).
        cpu_kv_cache_gib: the KV cache of the CPU build, in GiB (``VLLM_CPU_KVCACHE_SPACE``, if set, overrides it).
        max_model_len: the longest prompt plus completion the engine plans for (default: the model's context).
        tensor_parallel_size: GPUs one engine spans (ungated sampling only: gates need 1).
        max_num_seqs: completions decoded together (default: vLLM's).
    """

    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.4
    cpu_kv_cache_gib: float = 2.0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"vllm.cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"vllm.max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"vllm.max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Args:
        num_samples: completions per prompt (N).
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1 disables it).
        max_new_tokens: hard cap on generated tokens per completion.
        stop_strings: extra strings that end a completion (EOS always does).
        batch_size: completions generated together in one ``generate`` call.
        seed: global seed, mixed with each prompt's own seed.
        kv_cache: ``dynamic`` (grows with the completions; the default) or ``static`` (allocated
            once for the prompt plus ``max_new_tokens``, which spares the copy a growing cache makes
            at every step: the same tokens, 1.25x the tokens/s for the shipped reasoner at 256
            completions of 160 tokens per call on a CPU, ``benchmarks/sampling_speed.py``; it holds
            the longest completion's memory from the start, and not every architecture supports it).
            HF engine only.
        engine: ``hf`` (Hugging Face ``generate``, the default) or ``vllm`` (continuous batching; see
            ``docs/engines.md``). Either way the model's gates act on every token, and the trajectories
            are scored by the Hugging Face model, so results mean the same whichever engine sampled.
        vllm: the vLLM engine's settings (:class:`VLLMSettings`).
    """

    num_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.8
    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 16
    seed: int = 0
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    engine: Engine = "hf"
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        if self.kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache must be dynamic or static, got {self.kv_cache!r}")
        if self.engine not in get_args(Engine):
            raise ValueError(f"engine must be {' or '.join(get_args(Engine))}, got {self.engine!r}")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if isinstance(self.vllm, dict):  # from a checkpoint's hyperparameters or a config file
            object.__setattr__(self, "vllm", VLLMSettings(**self.vllm))

    @classmethod
    def greedy(cls, max_new_tokens: int = 512, batch_size: int = 16, kv_cache: Literal["dynamic", "static"] = "dynamic") -> SamplingConfig:
        """Greedy decoding, one completion per prompt (the paper's evaluation)."""
        return cls(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size, kv_cache=kv_cache)

    def as_greedy(self) -> SamplingConfig:
        """These settings (engine, token budget, batching) decoding greedily, one completion per prompt."""
        return replace(self, num_samples=1, temperature=0.0)


@dataclass(frozen=True)
class SamplingRequest:
    """What one call asks an engine to sample: every ``(prompt, sample)`` row, with the prompts' tokens and seeds.

    Args:
        prompt_ids: each prompt's token ids.
        rows: ``(prompt index, sample index)`` of each completion, in order.
        prompt_seeds: each prompt's seed.
        config: the sampling settings.
        eos_ids: the tokens that end a completion.
    """

    prompt_ids: list[list[int]]
    rows: list[tuple[int, int]]
    prompt_seeds: list[int]
    config: SamplingConfig
    eos_ids: list[int]

    def completion_seed(self, row: tuple[int, int]) -> int:
        """The seed of one row's completion (the global seed, its prompt's seed, its sample index)."""
        prompt, sample = row
        return row_seed(self.config.seed, self.prompt_seeds[prompt], sample)


@dataclass
class Trajectories:
    """Completions of a set of prompts, as token lists plus padded tensors for scoring.

    Row ``r`` is sample ``sample_index[r]`` of prompt ``prompt_index[r]``. ``completion_ids`` ends
    at (and includes) the EOS token or the token that completed a stop string.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    prompt_index: list[int]
    sample_index: list[int]
    pad_token_id: int
    _padded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_completion_tokens(self) -> int:
        """Total number of generated tokens over all rows."""
        return sum(len(ids) for ids in self.completion_ids)

    def select(self, rows: Sequence[int]) -> Trajectories:
        """A new :class:`Trajectories` with only ``rows`` (e.g. one chunk for scoring)."""
        return Trajectories(
            prompt_ids=[self.prompt_ids[r] for r in rows],
            completion_ids=[self.completion_ids[r] for r in rows],
            completions=[self.completions[r] for r in rows],
            prompt_index=[self.prompt_index[r] for r in rows],
            sample_index=[self.sample_index[r] for r in rows],
            pad_token_id=self.pad_token_id,
        )

    @classmethod
    def of_groups(cls, groups: Sequence[Trajectories]) -> Trajectories:
        """One set from per-prompt groups: group ``p`` becomes prompt ``p``'s rows, in order."""
        return cls(
            prompt_ids=[ids for group in groups for ids in group.prompt_ids],
            completion_ids=[ids for group in groups for ids in group.completion_ids],
            completions=[text for group in groups for text in group.completions],
            prompt_index=[prompt for prompt, group in enumerate(groups) for _ in range(len(group))],
            sample_index=[index for group in groups for index in group.sample_index],
            pad_token_id=groups[0].pad_token_id,
        )

    def chunks(self, chunk_size: int) -> Iterator[tuple[range, Trajectories]]:
        """Yield ``(rows, trajectories)`` in chunks of at most ``chunk_size`` rows."""
        for start in range(0, len(self), chunk_size):
            rows = range(start, min(start + chunk_size, len(self)))
            yield rows, self.select(rows)

    def padded(self) -> dict[str, torch.Tensor]:
        """Left-padded prompts followed by right-padded completions, as tensors.

        Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` of shape
        (rows, prompt_width + completion_width), plus ``position_ids`` counted from each row's first
        real token. ``completion_mask`` is 1 exactly on generated tokens.
        """
        if not self._padded:
            self._padded.update(pad_rows(self.prompt_ids, self.completion_ids, self.pad_token_id))
        return self._padded


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(len(c) for c in completions)
    rows = len(prompts)
    input_ids = torch.full((rows, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start = prompt_width - len(prompt)
        end = prompt_width + len(completion)
        input_ids[row, start:prompt_width] = torch.tensor(prompt)
        input_ids[row, prompt_width:end] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, start:end] = 1
        completion_mask[row, prompt_width:end] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": position_ids,
    }


def context_length(model: nn.Module) -> int | None:
    """The number of positions the model was built for (``max_position_embeddings``), if it says."""
    return getattr(unwrap_model(model).config, "max_position_embeddings", None)


def check_context_length(model: nn.Module, lengths: Sequence[int], texts: Sequence[str], new_tokens: int = 0, what: str = "prompt") -> None:
    """Refuse a ``what`` (a prompt) longer than the model's context; warn if generation would run past it."""
    context = context_length(model)
    if not context or not lengths:
        return
    longest = max(range(len(lengths)), key=lambda index: lengths[index])
    if lengths[longest] > context:
        raise ValueError(
            f"A {what} has {lengths[longest]} tokens, more than the model's context of {context} "
            f"({texts[longest][:60]!r}...): shorten it or use a model with a longer context"
        )
    if lengths[longest] + new_tokens > context:  # shown once per setting by Python's warning filter
        warnings.warn(
            f"Prompts of up to {lengths[longest]} tokens plus max_new_tokens {new_tokens} exceed the model's "
            f"context of {context}: completions that run that long leave the positions it was trained on",
            stacklevel=3,
        )


def teacher_forced_trajectories(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], continuations: Sequence[str]) -> Trajectories:
    """Trajectories whose completions are given texts (e.g. reference solutions) followed by EOS."""
    if len(prompts) != len(continuations):
        raise ValueError(f"Got {len(prompts)} prompts but {len(continuations)} continuations")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in continuations]
    return Trajectories(
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        completions=list(continuations),
        prompt_index=list(range(len(prompts))),
        sample_index=[0] * len(prompts),
        pad_token_id=pad_id,
    )
