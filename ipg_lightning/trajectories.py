"""Trajectories: batched sampling of completions, and teacher-forced scoring of them.

Sampling draws every completion from its own random generator, seeded from the prompt's seed and
the sample index, so a trajectory does not depend on which other prompts share its batch, on the
batch size, or on the number of devices. Scoring returns the per-token log-probabilities of the
generated tokens only (prompt and padding masked), differentiable with respect to component gates.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from ipg_lightning.passes import TeacherForcedPasses
from ipg_lightning.seeds import prompt_seed, row_seed
from ipg_lightning.sites import unwrap_model
from ipg_lightning.token_log_probs import target_log_probs


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
    """

    num_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.8
    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    @classmethod
    def greedy(cls, max_new_tokens: int = 512, batch_size: int = 16) -> SamplingConfig:
        """Greedy decoding, one completion per prompt (the paper's evaluation)."""
        return cls(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)


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
            self._padded.update(_pad(self.prompt_ids, self.completion_ids, self.pad_token_id))
        return self._padded


def _pad(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
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


def row_uniforms(seed: int, steps: int) -> torch.Tensor:
    """The ``steps`` uniforms one completion samples with, from its own CPU generator (the same on every device)."""
    return torch.rand(steps, generator=torch.Generator().manual_seed(seed))


class InverseCDFSampler(LogitsProcessor):
    """Samples every row's next token at once, by inverse CDF from that row's own pre-drawn uniforms.

    Row r's uniforms ``u[r, t]`` (one per step) come from a generator seeded for that completion
    alone, so what a row draws never depends on its batch; the draw itself is one batched op per
    step: the token where the (temperature, top-p) distribution's cumulative probability first
    exceeds ``u``. The chosen token's score is set to ``+inf``, so greedy decoding in ``generate``
    emits it while ``generate`` keeps handling the KV cache, EOS, stop strings and padding.

    Args:
        uniforms: (rows, max_new_tokens) uniforms in [0, 1).
        temperature: sampling temperature (> 0).
        top_p: nucleus mass; tokens outside the smallest set reaching it are never drawn.
    """

    def __init__(self, uniforms: torch.Tensor, temperature: float, top_p: float) -> None:
        self.uniforms = uniforms
        self.temperature = temperature
        self.top_p = top_p
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        order = None
        if self.top_p < 1:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        target = self.uniforms[:, self.step : self.step + 1].to(cdf) * cdf[:, -1:]
        self.step += 1
        chosen = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        if order is not None:
            chosen = order.gather(-1, chosen)
        return scores.scatter_(-1, chosen, float("inf"))


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = getattr(getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


def _completion_end(ids: list[int], eos_ids: set[int], stop_strings: tuple[str, ...], decode) -> int:
    """Number of tokens up to and including the first EOS or the token completing a stop string."""
    end = next((i + 1 for i, token in enumerate(ids) if token in eos_ids), len(ids))
    if stop_strings and any(stop in decode(ids[:end]) for stop in stop_strings):
        low, high = 1, end  # smallest prefix whose text holds a stop string
        while low < high:
            middle = (low + high) // 2
            if any(stop in decode(ids[:middle]) for stop in stop_strings):
                high = middle
            else:
                low = middle + 1
        end = low
    return end


@torch.no_grad()
def sample_trajectories(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: SamplingConfig = SamplingConfig(),
    prompt_seeds: Sequence[int] | None = None,
    progress: bool = False,
    first_sample: int = 0,
) -> Trajectories:
    """Sample ``config.num_samples`` completions of each prompt with ``model`` (gates attached or not).

    Args:
        model: a causal LM (plain or PEFT-wrapped).
        tokenizer: its tokenizer; prompts are encoded without adding special tokens, as given.
        prompts: prompt texts (already templated).
        config: sampling settings.
        prompt_seeds: one seed per prompt (e.g. the dataset example's seed); by default derived
            from the prompt text, so results never depend on batch composition.
        progress: show a progress bar over completions.
        first_sample: the sample index of each prompt's first completion: ``first_sample = N``
            draws N further completions, different from the first N and as reproducible.
    """
    if not prompts:
        raise ValueError("sample_trajectories needs at least one prompt")
    seeds = [prompt_seed(p) for p in prompts] if prompt_seeds is None else [int(s) for s in prompt_seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"Got {len(seeds)} prompt seeds for {len(prompts)} prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("A prompt encodes to zero tokens; every prompt needs text")
    check_context_length(model, [len(ids) for ids in encoded], prompts, config.max_new_tokens)
    rows = [(p, s) for p in range(len(prompts)) for s in range(first_sample, first_sample + config.num_samples)]
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stop_strings=list(config.stop_strings) or None,
    )
    device = next(unwrap_model(model).parameters()).device
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    completion_ids: list[list[int]] = []
    bar = tqdm(total=len(rows), desc="sampling", unit="completion", disable=not progress)
    for start in range(0, len(rows), config.batch_size):
        batch_rows = rows[start : start + config.batch_size]
        padded = _pad([encoded[p] for p, _ in batch_rows], [[] for _ in batch_rows], pad_id)
        processors = LogitsProcessorList()
        if config.temperature > 0:
            uniforms = torch.stack([row_uniforms(row_seed(config.seed, seeds[p], s), config.max_new_tokens) for p, s in batch_rows])
            processors.append(InverseCDFSampler(uniforms.to(device), config.temperature, config.top_p))
        output = unwrap_model(model).generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            generation_config=generation_config,
            logits_processor=processors,
            tokenizer=tokenizer if config.stop_strings else None,
        )
        for generated in output[:, padded["input_ids"].shape[1] :].tolist():
            completion_ids.append(generated[: _completion_end(generated, set(eos_ids), config.stop_strings, decode)])
        bar.update(len(batch_rows))
    bar.close()
    return Trajectories(
        prompt_ids=[encoded[p] for p, _ in rows],
        completion_ids=completion_ids,
        completions=[tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids],
        prompt_index=[p for p, _ in rows],
        sample_index=[s for _, s in rows],
        pad_token_id=pad_id,
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


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters


def completion_log_probs(model: nn.Module, trajectories: Trajectories) -> torch.Tensor:
    """Teacher-forced log-probabilities of the generated tokens, shape (rows, completion_width).

    Entries outside ``completion_mask`` (padding after a completion ends) are 0. The result is
    differentiable with respect to whatever requires grad (gates attached to ``model``); only the
    logits of completion positions are computed when the model supports ``logits_to_keep``.
    """
    device = next(unwrap_model(model).parameters()).device
    batch = {k: v.to(device) for k, v in trajectories.padded().items()}
    completion_mask = batch.pop("completion_mask")
    prompt_width = max(len(ids) for ids in trajectories.prompt_ids)
    completion_width = completion_mask.shape[1] - prompt_width
    extra = {"logits_to_keep": completion_width + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(**batch, use_cache=False, **extra).logits
    logits = logits[:, -(completion_width + 1) : -1]
    targets = batch["input_ids"][:, prompt_width:]
    log_probs = target_log_probs(logits, targets)
    return log_probs * completion_mask[:, prompt_width:]


def completion_mask(trajectories: Trajectories, log_probs: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of generated tokens aligned with ``completion_log_probs(model, trajectories)``."""
    return trajectories.padded()["completion_mask"][:, -log_probs.shape[1] :].to(log_probs.device)


def mean_completion_nll(model: nn.Module, trajectories: Trajectories) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (teacher forcing; padding excluded).

    The loss of next-token training on reference solutions, differentiable like
    :func:`completion_log_probs`.
    """
    log_probs = completion_log_probs(model, trajectories)
    mask = completion_mask(trajectories, log_probs)
    return -(log_probs * mask).sum() / mask.sum().clamp(min=1)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on all of ``model``'s own parameters; restore the flags on exit.

    Backward then computes only what gates (parameters outside the model) need.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _weighted_log_likelihood(
    model: nn.Module, trajectories: Trajectories, weights: torch.Tensor, chunk_size: int, backward: bool, passes: TeacherForcedPasses | None
) -> float:
    if weights.shape != (len(trajectories),):
        raise ValueError(f"Expected one weight per trajectory ({len(trajectories)}), got shape {tuple(weights.shape)}")
    passes = passes if passes is not None else TeacherForcedPasses(model, chunk_size)
    total = 0.0
    with frozen_parameters(model), torch.set_grad_enabled(backward):
        for rows, chunk in passes.chunks(trajectories):
            with passes.run(rows):
                log_probs = completion_log_probs(model, chunk)
                chunk_weights = weights[rows.start : rows.stop].to(device=log_probs.device, dtype=torch.float32)
                surrogate = (chunk_weights * log_probs.sum(-1)).sum()
                if backward and surrogate.requires_grad:
                    surrogate.backward()
            total += surrogate.item()
    return total


def weighted_log_likelihood(
    model: nn.Module, trajectories: Trajectories, weights: torch.Tensor, chunk_size: int = 8, passes: TeacherForcedPasses | None = None
) -> float:
    """The value of ``L = sum_r weights[r] * sum_t log pi(a_t^r | ...)``, without gradients.

    ``passes`` (:class:`~ipg_lightning.passes.TeacherForcedPasses`) decides the chunks instead of
    ``chunk_size`` and replays or checkpoints blocks, the same way for every pass over ``trajectories``.
    """
    return _weighted_log_likelihood(model, trajectories, weights, chunk_size, backward=False, passes=passes)


def backward_weighted_log_likelihood(
    model: nn.Module,
    trajectories: Trajectories,
    weights: torch.Tensor,
    chunk_size: int = 8,
    passes: TeacherForcedPasses | None = None,
) -> float:
    """Backpropagate ``L = sum_r weights[r] * sum_t log pi(a_t^r | ...)`` in chunks of rows.

    This is the policy-gradient surrogate with ``weights`` as advantages: gradients accumulate into
    the ``.grad`` of the attached gates, the model's own parameters are frozen, and peak memory is
    bounded by ``chunk_size`` rows. ``passes`` (:class:`~ipg_lightning.passes.TeacherForcedPasses`)
    decides the chunks instead (by rows and tokens), and replays the frozen blocks below the gates
    or checkpoints the live ones, the same way for every pass over ``trajectories``. Returns the value of ``L``.
    """
    return _weighted_log_likelihood(model, trajectories, weights, chunk_size, backward=True, passes=passes)
