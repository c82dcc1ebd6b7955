"""Where reasoning rows come from: the built-in task, ``reasoning-gym``, local files, or the hub.

Every loader returns raw rows (dicts) per split plus a label that error messages use to name the
source. Generated sources (built-in task, reasoning-gym) draw one seeded stream, drop repeated
questions, and deal it out test first, then validation, then train, so splits never overlap.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from ipg_lightning.data.synthetic import ArithmeticChainTask

SPLITS: tuple[str, ...] = ("train", "val", "test")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: Suffixes of data files that are not supported: named as such instead of looked up on the hub.
OTHER_FILE_SUFFIXES = frozenset({".txt", ".tsv", ".xlsx", ".xls", ".gz", ".zip", ".arrow", ".yaml", ".yml", ".md"})
REASONING_GYM_PREFIX = "reasoning_gym:"
#: How many draws per asked-for problem a reasoning-gym task gets before too few distinct ones are refused.
REASONING_GYM_MAX_DRAWS = 16


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names it."""


Rows = list[dict[str, Any]]


def _deal(stream: Rows, sizes: Mapping[str, int], label: str) -> dict[str, Rows]:
    unique, seen = [], set()
    for row in stream:
        if row["question"] not in seen:
            seen.add(row["question"])
            unique.append(row)
    needed = sum(sizes.values())
    if len(unique) < needed:
        raise DataSourceError(
            f"{label} gave only {len(unique)} distinct problems, {needed} were asked for; lower the split sizes or raise the task's difficulty range"
        )
    out, start = {}, 0
    for split in ("test", "val", "train"):
        out[split] = unique[start : start + sizes[split]]
        start += sizes[split]
    return out


def synthetic_rows(task: ArithmeticChainTask, sizes: Mapping[str, int]) -> dict[str, Rows]:
    """Rows of the built-in arithmetic task, disjoint across splits."""
    needed = sum(sizes.values())
    stream = [task.example(i) for i in range(2 * needed + 16)]
    return _deal(stream, sizes, "the synthetic arithmetic task")


def reasoning_gym_rows(task_name: str, sizes: Mapping[str, int], seed: int, task_kwargs: Mapping[str, Any]) -> dict[str, Rows]:
    """Rows of a ``reasoning-gym`` task (offline, seeded), disjoint across splits.

    The rationale in ``metadata["answer_cot"]`` (e.g. ``gsm_symbolic``), when present, becomes the
    reference solution.
    """
    needed = sum(sizes.values())
    # A task with few distinct problems repeats them often: draw a longer stream before refusing. Entry i of a
    # seeded reasoning-gym dataset does not depend on its size, so the longer stream starts with the shorter one.
    for draws in (2 * needed + 16, REASONING_GYM_MAX_DRAWS * needed + 16):
        stream = _reasoning_gym_stream(task_name, draws, seed, task_kwargs)
        if len({row["question"] for row in stream}) >= needed:
            break
    return _deal(stream, sizes, f"reasoning-gym task {task_name!r} (in {len(stream)} draws)")


def _reasoning_gym_stream(task_name: str, size: int, seed: int, task_kwargs: Mapping[str, Any]) -> Rows:
    import reasoning_gym

    try:  # bad knobs can pass the config and fail only when problems are generated
        entries = list(reasoning_gym.create_dataset(task_name, size=size, seed=seed, **task_kwargs))
    except (KeyError, ValueError, TypeError, IndexError) as error:
        raise DataSourceError(f"reasoning-gym task {task_name!r} with {dict(task_kwargs)} failed: {error}; check the task's settings") from None
    stream = []
    for entry in entries:
        solution = entry.get("metadata", {}).get("answer_cot")
        stream.append({"question": entry["question"], "answer": str(entry["answer"]), "solution": solution})
    return stream


def _check_text(path: Path) -> None:
    """Refuse a text file that is empty or not UTF-8, naming the file and the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                blank = blank and not decoder.decode(chunk).strip()
            except UnicodeDecodeError as error:
                byte = chunk[error.start]
                raise DataSourceError(
                    f"{path} is not UTF-8 text (byte 0x{byte:02x} at offset {offset + error.start}): "
                    "re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            offset += len(chunk)
    if blank:
        raise DataSourceError(f"{path} is empty: it has no rows")


def _check_jsonl(path: Path) -> None:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataSourceError(f"{path}: line {number} is not valid JSON ({error.msg})") from None


def read_file(path: str | Path) -> datasets.Dataset:
    """Read a jsonl/json/csv/parquet file into a ``datasets.Dataset``, with errors that name the file."""
    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
    if not path.is_file():
        raise DataSourceError(f"Data file not found: {path}")
    if builder != "parquet":
        _check_text(path)
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types; the user needs the file and the reason
        cause = error.__cause__ or error
        raise DataSourceError(f"Could not read {path}: {type(cause).__name__}: {cause}") from None


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both shares in [0, 1) and together below 1, so that some rows are left for training."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be >= 0 with a sum below 1, got {val_fraction} and {test_fraction}")


def split_by_fraction(rows: Rows, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Rows]:
    """Shuffle ``rows`` with ``seed`` and cut validation and test shares off the front."""
    check_fractions(val_fraction, test_fraction)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_test, num_val = round(len(rows) * test_fraction), round(len(rows) * val_fraction)
    pick = lambda part: [rows[i] for i in part]  # noqa: E731
    return {
        "test": pick(order[:num_test]),
        "val": pick(order[num_test : num_test + num_val]),
        "train": pick(order[num_test + num_val :]),
    }


def hub_rows(name: str, config_name: str | None, split: str) -> Rows:
    """Rows of a hub dataset split; fails with a clear message when the hub cannot be reached."""
    try:
        return datasets.load_dataset(name, config_name, split=split).to_list()
    except Exception as error:  # connection, missing dataset or offline mode
        raise DataSourceError(
            f"Could not load hub dataset {name!r} (config {config_name!r}, split {split!r}): {error}. "
            "Without hub access, point `source` at a local .jsonl/.json/.csv/.parquet file, "
            "'synthetic', or 'reasoning_gym:<task>'."
        ) from None


def is_file_source(source: str) -> bool:
    """True if ``source`` names a local file rather than a hub dataset: an existing file, a path, or a
    name with a file suffix (an unsupported one is then refused by :func:`read_file`, naming it)."""
    path = Path(source)
    return path.is_file() or source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS or path.suffix.lower() in OTHER_FILE_SUFFIXES
