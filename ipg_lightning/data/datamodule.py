"""``ReasoningDataModule``: reasoning problems from any source, as batches of templated prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from ipg_lightning.data.batch import ReasoningBatch
from ipg_lightning.data.examples import ColumnSpec, ReasoningExample, RowFormat, parse_rows
from ipg_lightning.data.prompts import PromptTemplate
from ipg_lightning.data.sources import (
    REASONING_GYM_PREFIX,
    SPLITS,
    DataSourceError,
    check_fractions,
    hub_rows,
    is_file_source,
    read_file,
    reasoning_gym_rows,
    split_by_fraction,
    synthetic_rows,
)
from ipg_lightning.data.synthetic import ArithmeticChainTask


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` each epoch, so a run resumed from a checkpoint sees the same
    order as an uninterrupted one (a plain seeded DataLoader generator would restart its stream).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ReasoningDataModule(L.LightningDataModule):
    """Reasoning problems as batches of prompts with gold answers, for sampling-based loops.

    Args:
        source: ``"synthetic"`` (built-in arithmetic task), ``"reasoning_gym:<task>"`` (e.g.
            ``reasoning_gym:gsm_symbolic``), a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file,
            or a hub dataset name (only where the hub is reachable).
        data_files: explicit files per split (``{"train": ..., "val": ..., "test": ...}``); replaces
            ``source`` and the fraction split.
        row_format: ``gsm8k`` (question / answer with ``####``), ``math`` (MATH, MATH-500: problem /
            solution with ``\\boxed{}``, or an answer column), ``aime`` (problem / integer answer),
            ``gpqa`` (GPQA-Diamond's question and four answers, shuffled with ``seed`` and graded by
            letter), ``columns`` (see ``columns``) or ``auto`` (detected from the columns); see
            :mod:`~ipg_lightning.data.examples`.
        columns: column names for ``row_format="columns"``.
        num_train: train examples (exact for generated sources; a cap for files and hub data).
        num_val: validation examples (the attribution support set), same meaning.
        num_test: test (evaluation) examples, same meaning.
        val_fraction: share of a single file (or hub train split) held out for validation.
        test_fraction: share of a single file held out for test (hub data uses its test split).
        seed: seed of generated data, of splitting, and of every example's sampling seed.
        batch_size: prompts per batch.
        template: how questions become prompts (chat template when the tokenizer has one).
        on_bad_row: ``raise`` stops at the first bad row, naming file and row; ``skip`` drops bad rows
            and counts them in :attr:`skipped_rows`.
        synthetic_task: settings of the built-in arithmetic task.
        task_kwargs: keyword arguments of the reasoning-gym task (e.g. ``{"difficulty": 1.0}``).
        hub_config: hub dataset configuration name (e.g. ``main`` for ``openai/gsm8k``).
        hub_test_split: the hub split used as test data.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: str = "synthetic",
        data_files: dict[str, str] | None = None,
        row_format: RowFormat = "auto",
        columns: ColumnSpec = ColumnSpec(),
        num_train: int | None = 256,
        num_val: int | None = 32,
        num_test: int | None = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 4,
        template: PromptTemplate = PromptTemplate(),
        on_bad_row: Literal["raise", "skip"] = "raise",
        synthetic_task: ArithmeticChainTask = ArithmeticChainTask(),
        task_kwargs: dict[str, Any] | None = None,
        hub_config: str | None = None,
        hub_test_split: str = "test",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        if data_files is not None and set(data_files) - set(SPLITS):
            raise ValueError(f"data_files keys must be among {list(SPLITS)}, got {sorted(data_files)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for split, size in {"num_train": num_train, "num_val": num_val, "num_test": num_test}.items():
            if size is not None and size < 0:
                raise ValueError(f"{split} must be >= 0 (or null for all rows of a file), got {size}")
        check_fractions(val_fraction, test_fraction)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.data_files = data_files
        self.row_format = row_format
        self.columns = columns
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.template = template
        self.on_bad_row = on_bad_row
        self.synthetic_task = synthetic_task
        self.task_kwargs = dict(task_kwargs or {})
        self.hub_config = hub_config
        self.hub_test_split = hub_test_split
        self.num_workers = num_workers
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.examples: dict[str, list[ReasoningExample]] = {}
        #: Number of rows dropped per source label when ``on_bad_row="skip"``.
        self.skipped_rows: dict[str, int] = {}

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Hand over the model's tokenizer (known only once the model is loaded) for prompt templates."""
        self.tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and split the data once; later calls reuse it."""
        if not self.examples:
            self.examples = self._load()

    def _generated_sizes(self) -> dict[str, int]:
        missing = [split for split, size in self.sizes.items() if size is None]
        if missing:
            raise ValueError(f"Generated sources need explicit sizes; num_{missing[0]} is None")
        return dict(self.sizes)

    def _load(self) -> dict[str, list[ReasoningExample]]:
        if self.data_files is not None:
            parsed = {split: self._parse_file(Path(path)) for split, path in self.data_files.items()}
            return {split: self._cap(split, parsed.get(split, [])) for split in SPLITS}
        if self.source == "synthetic":
            rows = synthetic_rows(self.synthetic_task, self._generated_sizes())
            return {split: self._parse(rows[split], "columns", f"synthetic {split}", split) for split in SPLITS}
        if self.source.startswith(REASONING_GYM_PREFIX):
            task = self.source[len(REASONING_GYM_PREFIX) :]
            rows = reasoning_gym_rows(task, self._generated_sizes(), self.seed, self.task_kwargs)
            return {split: self._parse(rows[split], "columns", f"{self.source} {split}", split) for split in SPLITS}
        if is_file_source(self.source):
            examples = self._parse_file(Path(self.source))
            splits = split_by_fraction(examples, self.val_fraction, self.test_fraction, self.seed)
            return {split: self._cap(split, splits[split]) for split in SPLITS}
        train = self._parse(hub_rows(self.source, self.hub_config, "train"), self.row_format, self.source, "train")
        test = self._parse(hub_rows(self.source, self.hub_config, self.hub_test_split), self.row_format, self.source, "test")
        splits = split_by_fraction(train, self.val_fraction, 0.0, self.seed)
        return {"train": self._cap("train", splits["train"]), "val": self._cap("val", splits["val"]), "test": self._cap("test", test)}

    def _parse_file(self, path: Path) -> list[ReasoningExample]:
        rows = read_file(path).to_list()
        return self._parse(rows, self.row_format, str(path), path.stem)

    def _cap(self, split: str, examples: list[ReasoningExample]) -> list[ReasoningExample]:
        size = self.sizes[split]
        return examples if size is None else examples[:size]

    def _parse(self, rows: Sequence[dict], row_format: RowFormat, label: str, id_prefix: str) -> list[ReasoningExample]:
        generated = label.startswith(("synthetic", REASONING_GYM_PREFIX))  # generated rows name their own columns
        columns = ColumnSpec("question", "answer", "solution") if generated else self.columns
        examples, skipped = parse_rows(rows, row_format, columns, label, id_prefix, self.seed, self.on_bad_row == "skip")
        if skipped:
            self.skipped_rows[label] = self.skipped_rows.get(label, 0) + skipped
        if rows and not examples:
            raise DataSourceError(f"{label}: no usable rows ({skipped} skipped as bad)")
        return examples

    def dataset(self, split: str) -> datasets.Dataset:
        """The examples of ``split`` (``train``, ``val`` or ``test``) as a ``datasets.Dataset``."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose from {list(SPLITS)}")
        self.setup()
        if not self.examples[split]:
            asked = f" (num_{split} is {self.sizes[split]})" if self.sizes[split] is not None else ""
            raise DataSourceError(f"The {split} split of {self.source!r} is empty{asked}: give it examples")
        return datasets.Dataset.from_list([asdict(example) for example in self.examples[split]])

    def full_batch(self, split: str) -> ReasoningBatch:
        """Every example of ``split`` as one batch, to generate for all of them in as few calls as memory allows."""
        return self.collate(self.dataset(split).to_list())

    def collate(self, rows: list[dict[str, Any]]) -> ReasoningBatch:
        """Batch rows: prompt texts rendered with the template, plus ids, gold answers and seeds."""
        return {
            "id": [row["id"] for row in rows],
            "prompt": [self.template.render(row["question"], self.tokenizer) for row in rows],
            "question": [row["question"] for row in rows],
            "answer": [row["answer"] for row in rows],
            "solution": [row["solution"] for row in rows],
            "seed": torch.tensor([row["seed"] for row in rows], dtype=torch.long),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        if not shuffle and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Evaluation shards without the repeated padding of DistributedSampler, so that no
            # prompt is counted twice in attribution scores or metrics.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def dataloader(self, split: str) -> DataLoader:
        """The loader of ``split`` (``train``, ``val`` or ``test``), as Lightning would get it."""
        loaders = {"train": self.train_dataloader, "val": self.val_dataloader, "test": self.test_dataloader}
        if split not in loaders:
            raise ValueError(f"Unknown split {split!r}; choose from {list(loaders)}")
        return loaders[split]()

    def train_dataloader(self) -> DataLoader:
        """Training prompts, shuffled by ``(seed, epoch)``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation prompts in order: the attribution support set."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test prompts in order: held-out evaluation, never overlapping validation."""
        return self._loader("test", shuffle=False)
