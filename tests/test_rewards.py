import pytest

from ipg_lightning.rewards.functions import (
    Completion,
    CompoundReward,
    accuracy,
    answer_present,
    load_reward,
    reasoning_length,
    reasoning_span_end,
    score_completions,
)


def _completion(text, gold="7", tokenizer=None):
    count = (lambda prefix: len(tokenizer(prefix, add_special_tokens=False)["input_ids"])) if tokenizer else None
    num_tokens = len(tokenizer(text)["input_ids"]) if tokenizer else len(text.split())
    return Completion(prompt="p", text=text, num_tokens=num_tokens, gold=gold, count_tokens=count)


def test_accuracy_and_answer_present():
    assert accuracy(_completion("3 + 4 = 7\n#### 7")) == 1.0
    assert accuracy(_completion("#### 7.0")) == 1.0
    assert accuracy(_completion("#### 8")) == 0.0
    assert accuracy(_completion("no idea")) == 0.0
    assert answer_present(_completion("no idea")) == 0.0
    with pytest.raises(ValueError, match="gold answer"):
        accuracy(_completion("#### 7", gold=None))


def test_reasoning_length_counts_tokens_before_think_end_or_marker(tokenizer):
    assert reasoning_length(_completion("abc</think>#### 7", tokenizer=tokenizer)) == 3  # the tiny tokenizer has one token per character
    assert reasoning_length(_completion("1+6=7\n#### 7", tokenizer=tokenizer)) == 6
    assert reasoning_length(_completion("so it is 7", tokenizer=tokenizer)) == 10  # no marker: all tokens
    assert reasoning_span_end("xx The answer is 7") == 3


def test_compound_reward_is_a_weighted_sum(tokenizer):
    completion = _completion("1+6=7\n#### 7", tokenizer=tokenizer)
    reward = CompoundReward({"accuracy": 2.0, "reasoning_length": -0.5})
    assert reward(completion) == 2.0 * 1 - 0.5 * 6
    assert load_reward({"accuracy": 1.0})(completion) == 1.0


def test_load_reward_by_name_import_path_or_callable():
    assert load_reward("accuracy") is accuracy
    assert load_reward("ipg_lightning.rewards:answer_present") is answer_present
    custom = lambda completion: 0.25  # noqa: E731
    assert load_reward(custom) is custom
    with pytest.raises(ValueError, match="Unknown reward 'acuracy'"):
        load_reward("acuracy")
    with pytest.raises(ValueError, match="Cannot import reward 'nowhere.module:fn'"):
        load_reward("nowhere.module:fn")
    with pytest.raises(ValueError, match="not callable"):
        load_reward("ipg_lightning.rewards.functions:BUILTIN_REWARDS")


def test_score_completions_rejects_non_finite_rewards():
    completions = [_completion("#### 7"), _completion("#### 8")]
    assert score_completions(accuracy, completions) == [1.0, 0.0]
    with pytest.raises(ValueError, match="completion 1"):
        score_completions(lambda c: float("nan") if "8" in c.text else 1.0, completions)
