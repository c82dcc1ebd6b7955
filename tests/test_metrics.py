import os
import re
import statistics

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ipg_lightning.metrics import AnswerRate, PassAtK, ReasoningAccuracy, ReasoningLength, ReflectionRate
from ipg_lightning.metrics import functional as F
from ipg_lightning.rewards.answers import extract_answer

COMPLETIONS = [
    "2 + 2 = 4\n#### 4",
    "Wait, 3 + 3 = 6. The answer is 6.",
    "I think it's 10",
    "no clue",
    "Let me check: 5 * 2 = 10\n#### 10",
    "\\boxed{7}",
    "hmm... #### 9",
    "The answer is 1,000.",
]
GOLDS = ["4", "6", "11", "3", "10", "8", "9", "1000"]
LENGTHS = [3.0, 10.0, 7.0, 0.0, 12.0, 1.0, 4.0, 6.0]


def _reference_accuracy(completions, golds):
    """Independent: plain string comparison of extracted values with gold normalised by hand."""
    hits = 0
    for text, gold in zip(completions, golds, strict=True):
        found = extract_answer(text)
        hits += found is not None and found.value == gold.replace(",", "")
    return hits / len(completions)


def _reference_reflection(completions):
    pattern = re.compile(r"\b(wait|let me check|hmm)\b", re.IGNORECASE)
    return sum(bool(pattern.search(text)) for text in completions) / len(completions)


def test_class_functional_and_reference_agree_over_batches():
    accuracy, answers, reflection, length = ReasoningAccuracy(), AnswerRate(), ReflectionRate(), ReasoningLength()
    for start in range(0, len(COMPLETIONS), 3):
        accuracy.update(COMPLETIONS[start : start + 3], GOLDS[start : start + 3])
        answers.update(COMPLETIONS[start : start + 3])
        reflection.update(COMPLETIONS[start : start + 3])
        length.update(LENGTHS[start : start + 3])
    expected_accuracy = _reference_accuracy(COMPLETIONS, GOLDS)
    assert expected_accuracy == 5 / 8
    assert accuracy.compute().item() == pytest.approx(expected_accuracy)
    assert F.reasoning_accuracy(COMPLETIONS, GOLDS).item() == pytest.approx(expected_accuracy)
    assert answers.compute().item() == pytest.approx(7 / 8)  # "no clue" has no number at all
    assert reflection.compute().item() == pytest.approx(_reference_reflection(COMPLETIONS)) == pytest.approx(3 / 8)
    summary = length.compute()
    assert summary["mean"].item() == pytest.approx(sum(LENGTHS) / len(LENGTHS))
    assert summary["max"].item() == 12.0 and summary["min"].item() == 0.0
    assert summary["q50"].item() == pytest.approx(statistics.median(LENGTHS))  # interpolated: 5.0


def test_reflection_markers_are_whole_words_and_configurable():
    assert F.reflection_counts(["Awaiting the waiter", "WAIT. wait!"], ["wait"]).tolist() == [0, 2]
    with pytest.raises(ValueError, match="At least one reflection marker"):
        ReflectionRate(markers=[])


def test_bad_metric_inputs_are_named():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        ReasoningAccuracy().update(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="non-negative"):
        ReasoningLength().update([-1.0])
    with pytest.raises(ValueError, match="Quantiles"):
        ReasoningLength(quantiles=(1.5,))


def _ddp_worker(rank, world_size, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    accuracy, length, passing = ReasoningAccuracy(), ReasoningLength(), PassAtK(ks=(1, 2))
    accuracy.update(COMPLETIONS[rank::world_size], GOLDS[rank::world_size])
    length.update(LENGTHS[rank::world_size])
    passing.update(F.correct_counts(COMPLETIONS, GOLDS).view(4, 2)[rank::world_size])
    results[rank] = (
        accuracy.compute().item(),
        length.compute()["mean"].item(),
        length.compute()["q50"].item(),
        *(value.item() for value in passing.compute().values()),
    )
    dist.destroy_process_group()


def test_states_reduce_across_two_ddp_processes():
    single_accuracy, single_length, single_passing = ReasoningAccuracy(), ReasoningLength(), PassAtK(ks=(1, 2))
    single_accuracy.update(COMPLETIONS, GOLDS)
    single_length.update(LENGTHS)
    single_passing.update(F.correct_counts(COMPLETIONS, GOLDS).view(4, 2))
    expected = (
        single_accuracy.compute().item(),
        single_length.compute()["mean"].item(),
        single_length.compute()["q50"].item(),
        *(value.item() for value in single_passing.compute().values()),
    )
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, 29517, results), nprocs=2, join=True)
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)
