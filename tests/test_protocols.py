"""Evaluation protocols, avg@k and pass@k, and the protocol recorded with every number."""

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from ipg_lightning.cli import run
from ipg_lightning.data import PromptTemplate
from ipg_lightning.evaluation import PROTOCOLS, apply_protocol, protocol_record
from ipg_lightning.metrics import PassAtK, ReasoningMetrics
from ipg_lightning.metrics import functional as F
from ipg_lightning.rewards.answers import is_correct
from ipg_lightning.rollout.trajectories import SamplingConfig

SAMPLES = Path(__file__).parent / "data" / "benchmarks"
DEFAULT = SamplingConfig(num_samples=1, temperature=0.0, top_p=0.8, max_new_tokens=512)


def _reference_pass_at_k(row: list[int], k: int) -> float:
    """Independent: the combinatorial definition."""
    n, c = len(row), sum(row)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_the_combinatorial_definition():
    hits = (torch.rand(50, 10, generator=torch.Generator().manual_seed(0)) < 0.3).long()
    for k in (1, 2, 3, 5, 10):
        expected = [_reference_pass_at_k(row, k) for row in hits.tolist()]
        assert F.pass_at_k(hits, k).tolist() == pytest.approx(expected, abs=1e-12)
    assert F.pass_at_k(hits, 1).mean().item() == pytest.approx(hits.float().mean().item())
    with pytest.raises(ValueError, match="pass@11 needs at least 11 samples"):
        F.pass_at_k(hits, 11)


def test_pass_at_k_metric_over_batches_equals_one_pass():
    hits = (torch.rand(12, 4, generator=torch.Generator().manual_seed(1)) < 0.5).long()
    metric = PassAtK(ks=(1, 2, 4))
    for part in hits.split(5):
        metric.update(part)
    values = metric.compute()
    for k in (1, 2, 4):
        assert values[f"pass@{k}"].item() == pytest.approx(F.pass_at_k(hits, k).mean().item())


def test_reasoning_metrics_report_avg_and_pass_at_k_for_several_samples():
    completions = ["#### 4", "#### 5", "#### 4", "#### 4", "#### 1", "#### 2", "#### 3", "#### 9"]
    golds = ["4"] * 4 + ["9"] * 4
    metrics = ReasoningMetrics(samples_per_problem=4)
    metrics.update(completions, golds, [1.0] * 8)
    values = metrics.compute()
    assert values["accuracy"] == values["avg@4"] == values["pass@1"] == pytest.approx(4 / 8)
    assert values["pass@2"] == pytest.approx((1.0 + 0.5) / 2) and values["pass@4"] == 1.0
    with pytest.raises(ValueError, match="not a multiple of 4"):
        metrics.update(completions[:3], golds[:3], [1.0] * 3)
    single = ReasoningMetrics()
    single.update(["#### 4"], ["4"], [1.0])
    assert "pass@1" not in single.compute() and "avg@1" not in single.compute()


def test_a_protocol_sets_the_decoding_and_refuses_a_conflicting_sampling_field():
    sampled = apply_protocol(DEFAULT, "sampled", DEFAULT)
    assert (sampled.temperature, sampled.top_p, sampled.num_samples, sampled.max_new_tokens) == (0.6, 0.95, 8, 512)
    assert apply_protocol(DEFAULT, "paper", DEFAULT).max_new_tokens == 2048
    assert apply_protocol(DEFAULT, None, DEFAULT) is DEFAULT
    with_budget = SamplingConfig(num_samples=1, temperature=0.0, top_p=0.8, max_new_tokens=64)
    assert apply_protocol(with_budget, "sampled", DEFAULT).max_new_tokens == 64  # the budget is the user's
    with pytest.raises(ValueError, match="--protocol paper sets max_new_tokens to 2048, but --sampling.max_new_tokens is 64"):
        apply_protocol(with_budget, "paper", DEFAULT)
    with pytest.raises(ValueError, match="Unknown protocol 'fast'"):
        apply_protocol(DEFAULT, "fast", DEFAULT)
    assert set(PROTOCOLS) == {"greedy", "paper", "sampled", "r1"}


def test_the_protocol_record_says_how_the_prompt_and_think_were_handled(tokenizer):
    record = protocol_record("sampled", apply_protocol(DEFAULT, "sampled", DEFAULT), PromptTemplate(), tokenizer)
    assert record["samples_per_problem"] == 8 and record["top_p"] == 0.95 and record["engine"] == "hf"
    assert record["prompt"]["chat_template"] is bool(tokenizer.chat_template) and record["prompt"]["instruction"]
    assert record["grader"]["math_verify_version"] and "</think>" in record["think"]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    try:
        assert record["think"] != protocol_record(None, DEFAULT, PromptTemplate(), tokenizer)["think"]
        assert protocol_record(None, DEFAULT, PromptTemplate(), tokenizer)["think"].startswith("the chat template opens <think>")
        assert protocol_record(None, DEFAULT, PromptTemplate(use_chat_template=False), tokenizer)["prompt"]["chat_template"] is False
    finally:
        tokenizer.chat_template = None


def test_evaluate_with_a_protocol_on_math500_records_it_and_pass_at_k(tmp_path, tiny_llama):
    data = ["--data.data_files", json.dumps({"test": str(SAMPLES / "math500.jsonl")}), "--data.num_test", "null"]
    data += ["--data.num_train", "0", "--data.num_val", "0"]
    run(["evaluate", "--protocol", "sampled", "--sampling.max_new_tokens", "12", "--output_dir", str(tmp_path / "out"), *data])
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    protocol, metrics = summary["protocol"], summary["metrics"]
    assert (protocol["name"], protocol["samples_per_problem"], protocol["temperature"], protocol["max_new_tokens"]) == ("sampled", 8, 0.6, 12)
    assert metrics["num_completions"] == 6 * 8 and metrics["avg@8"] == metrics["accuracy"]
    by_problem = defaultdict(list)
    for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_problem[record["id"]].append(int(is_correct(record["completion"], record["gold"])))
    for k in (1, 2, 4, 8):
        expected = sum(_reference_pass_at_k(row, k) for row in by_problem.values()) / len(by_problem)
        assert metrics[f"pass@{k}"] == pytest.approx(expected)
