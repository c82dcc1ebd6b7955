"""Sampling with a vLLM engine (``engine: vllm``): continuous batching, the model's gates mirrored inside.

One engine runs at a time, in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the gates'
hooks live on the modules that run), started from the Hugging Face model's own directory in its own
dtype and kept for every later call with the same model files and settings. vLLM only samples: the
token ids it returns become :class:`~ipg_lightning.rollout.trajectories.Trajectories` that the
Hugging Face model scores, so every log-probability, gradient and report is computed as with
``engine: hf``. Before each call, what the engine cannot reproduce is refused
(:func:`~ipg_lightning.rollout.vllm_gates.check_mirrorable`), the Hugging Face model's weights are
checked against the directory (:mod:`~ipg_lightning.rollout.vllm_weights`), and the prefix cache is
emptied (it holds prompts computed under the previous call's gates).

Seeds: on a GPU every completion has its own seed (the prompt's seed and the sample index, as with
the HF engine), so it does not depend on what shares its call. vLLM's CPU build cannot seed single
requests; there a call's completions follow one seed drawn from the call's prompt seeds and first
sample index: the same call gives the same completions, but a prompt sampled beside other prompts
gives other ones.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ipg_lightning.model.interventions import installed_interventions
from ipg_lightning.model.loading import EXPORT_SIDE_FILES
from ipg_lightning.model.sites import unwrap_model
from ipg_lightning.rollout.seeds import row_seed
from ipg_lightning.rollout.trajectories import SamplingRequest, VLLMSettings
from ipg_lightning.rollout.vllm_gates import USE_HF, EngineGateError, check_mirrorable, mirrored_gates, probe_gates
from ipg_lightning.rollout.vllm_weights import WeightsWatch, weight_files_fingerprint

#: Named in the error where vLLM is missing (the README has the line for CPU machines).
INSTALL_HINT = 'install it with `pip install -e ".[vllm]"` on a GPU machine, or with the README\'s engine line on a CPU one'


@dataclass
class RunningEngine:
    """A started vLLM engine and the torch module it runs.

    Args:
        key: what it was started for: model directory, its weight files, dtype and settings.
        llm: the ``vllm.LLM``.
        model: its model's root module (where gates are mirrored); None with tensor parallelism.
        per_request_seeds: whether single requests can be seeded (not on vLLM's CPU build).
        weights: which Hugging Face model objects were found to hold the directory's weights.
        view: for an export with a steering file, the directory of links the engine loaded instead.
    """

    key: tuple[str, tuple, str, VLLMSettings]
    llm: Any
    model: nn.Module | None
    per_request_seeds: bool
    weights: WeightsWatch
    view: tempfile.TemporaryDirectory | None = None


_RUNNING: RunningEngine | None = None


def model_directory_of(model: nn.Module) -> str:
    """The local directory the Hugging Face model was loaded from, which the engine loads too."""
    path = getattr(unwrap_model(model), "name_or_path", "") or ""
    if not (path and Path(path).is_dir()):
        raise ValueError(
            f"`engine: vllm` loads the model from its local directory, and this model has none ({path or 'built in memory'!r}): "
            f"save it with save_pretrained and load it from there, or {USE_HF}"
        )
    return str(Path(path).resolve())


def engine_for(model: nn.Module, settings: VLLMSettings) -> RunningEngine:
    """The running engine for ``model``'s directory and dtype with ``settings``, started (and any other stopped) if needed.

    Raises ``ValueError`` if the model's weights in memory differ from its directory's."""
    global _RUNNING
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            f"`engine: vllm` runs one engine in one process, and this run has {torch.distributed.get_world_size()} (DDP): "
            f"run it in one process (tensor_parallel_size spreads an ungated engine over GPUs), or {USE_HF}"
        )
    directory = model_directory_of(model)
    dtype = str(next(unwrap_model(model).parameters()).dtype).removeprefix("torch.")
    key = (directory, weight_files_fingerprint(directory), dtype, settings)
    if _RUNNING is None or _RUNNING.key != key:
        stop_engine()
        _RUNNING = _start(key)
    differing = _RUNNING.weights.differing_tensor(model)
    if differing is not None:
        raise ValueError(
            f"The model's weights in memory differ from its directory's, which the vLLM engine loads ({differing}, {directory}): "
            f"save the model and load it from there, or {USE_HF}"
        )
    return _RUNNING


def stop_engine() -> None:
    """Stop the running engine, if any, and free its memory."""
    global _RUNNING
    if _RUNNING is None:
        return
    running, _RUNNING = _RUNNING, None
    try:
        running.llm.llm_engine.engine_core.shutdown()
    finally:
        if running.view is not None:
            running.view.cleanup()
        running.llm = running.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def platform_seeds_single_requests() -> bool:
    """Whether this machine's vLLM seeds single requests (every GPU build; not the CPU build)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return not current_platform.is_cpu()


def _start(key: tuple[str, tuple, str, VLLMSettings]) -> RunningEngine:
    directory, _, dtype, settings = key
    # the hooks that apply the gates must sit on the modules that run: the engine core stays in this process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError(f"`engine: vllm` needs vLLM ({error}): {INSTALL_HINT}") from None
    per_request_seeds = platform_seeds_single_requests()
    options = {"max_model_len": settings.max_model_len, "max_num_seqs": settings.max_num_seqs}
    if not per_request_seeds:  # the CPU build: its KV cache in bytes (VLLM_CPU_KVCACHE_SPACE, if set, wins)
        options["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gib * 2**30)
    print(f"starting the vLLM engine for {directory} ({dtype})", file=sys.stderr, flush=True)
    view = _without_steering_file(directory)
    llm = None
    try:
        with random_state_kept():  # vLLM seeds random, numpy and torch while it starts
            llm = LLM(
                model=directory if view is None else view.name,
                dtype=dtype,
                enforce_eager=settings.enforce_eager,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                tensor_parallel_size=settings.tensor_parallel_size,
                generation_config="vllm",  # sampling follows SamplingConfig alone, not the checkpoint's defaults
                seed=0,
                **{name: value for name, value in options.items() if value is not None},
            )
        model = llm.apply_model(lambda module: module)[0] if settings.tensor_parallel_size == 1 else None
    except BaseException:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if view is not None:
            view.cleanup()
        raise
    skip = frozenset(EXPORT_SIDE_FILES) if view is not None else frozenset()
    return RunningEngine(key, llm, model, per_request_seeds, WeightsWatch(directory, skip), view)


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Restore Python's, numpy's and torch's (CPU and CUDA) random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _without_steering_file(directory: str) -> tempfile.TemporaryDirectory | None:
    """For an export that carries its steering files (which vLLM would read as weights): a temporary
    directory of links to everything else in it, removed with the engine. None for any other directory."""
    if not any((Path(directory) / name).exists() for name in EXPORT_SIDE_FILES):
        return None
    view = tempfile.TemporaryDirectory(prefix="ipg-vllm-model-")
    for entry in Path(directory).iterdir():
        if entry.name not in EXPORT_SIDE_FILES:
            (Path(view.name) / entry.name).symlink_to(entry.resolve())
    return view


def call_seed(global_seed: int, prompt_seeds: list[int], first_sample: int) -> int:
    """The one seed of a whole call, where single requests cannot be seeded (vLLM's CPU build)."""
    key = ",".join(map(str, prompt_seeds)).encode()
    return row_seed(global_seed, int.from_bytes(hashlib.sha256(key).digest()[:4], "little"), first_sample)


def generate_with_vllm(model: nn.Module, request: SamplingRequest, progress: bool) -> list[list[int]]:
    """The generated token ids of every row of ``request``, sampled by the vLLM engine under ``model``'s gates."""
    config, rows = request.config, request.rows
    gated = installed_interventions(model)
    check_mirrorable(model, gated)  # before the engine starts: a refusal costs nothing
    if gated and config.vllm.tensor_parallel_size != 1:
        raise EngineGateError(f"Gates act inside a vLLM engine of tensor_parallel_size 1 only: {USE_HF}")
    engine = engine_for(model, config.vllm)  # says how to install vLLM where it is missing
    from vllm import SamplingParams

    def params(seed: int | None, temperature: float = config.temperature, max_tokens: int = config.max_new_tokens) -> Any:
        return SamplingParams(
            temperature=temperature,
            top_p=config.top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
            stop=list(config.stop_strings) or None,
            include_stop_str_in_output=True,
            ignore_eos=True,  # stop at eos_ids only (below), as the HF engine does, not also at the tokenizer's own EOS
            stop_token_ids=request.eos_ids,
            seed=seed,
        )

    sampled = config.temperature > 0
    prompts = [{"prompt_token_ids": request.prompt_ids[prompt]} for prompt, _ in rows]
    # vLLM draws its own bar (it divides by the bar's elapsed time, so never hand it a disabled one)
    bar = partial(tqdm, unit="completion") if progress and sys.stderr.isatty() else False
    try:
        with mirrored_gates(gated, engine.model) as counts:
            if not engine.llm.reset_prefix_cache():  # cached prompts were computed under the previous call's gates
                raise RuntimeError("vLLM could not empty its prefix cache, which holds prompts computed under other gates; the engine was stopped")
            probe_gates(counts, lambda: engine.llm.generate(prompts[:1], params(None, 0.0, 1), use_tqdm=False))
            if engine.per_request_seeds or not sampled:
                request_params = [params(request.completion_seed(row) if sampled else None) for row in rows]
                outputs = engine.llm.generate(prompts, request_params, use_tqdm=bar)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(call_seed(config.seed, request.prompt_seeds, rows[0][1]))
                    outputs = engine.llm.generate(prompts, params(None), use_tqdm=bar)
            silent = counts.silent()
    except BaseException:
        stop_engine()  # requests of an interrupted call would otherwise stay queued in the kept engine
        raise
    if silent:
        raise EngineGateError(f"The gates of {silent[0]} stopped acting inside the vLLM engine during sampling: {USE_HF}")
    if len(outputs) != len(rows):
        stop_engine()
        raise RuntimeError(f"The vLLM engine returned {len(outputs)} completions for {len(rows)} requests; it was stopped")
    return [list(output.outputs[0].token_ids) for output in outputs]
