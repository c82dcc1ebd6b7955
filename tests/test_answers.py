import random

import pytest

from ipg_lightning.rewards.answers import answers_match, boxed_spans, extract_answer, normalize_answer, parse_number

EXTRACTION_CASES = [
    # (text, expected value, expected method)
    ("3 + 4 = 7\n#### 7", "7", "hash"),
    ("#### 1,234", "1234", "hash"),
    ("####$12.00.", "12", "hash"),
    ("#### -5", "-5", "hash"),
    ("#### 3/4", "0.75", "hash"),
    ("#### 1/3", "1/3", "hash"),
    ("The answer is -5.", "-5", "answer_is"),
    ("The answer is: 42", "42", "answer_is"),
    ("Final answer: 18 apples", "18", "answer_is"),
    ("The answer is 12. Then 13 more", "12", "answer_is"),
    ("\\boxed{\\frac{3}{4}}", "0.75", "boxed"),
    ("\\boxed{\\dfrac{1}{3}}", "1/3", "boxed"),
    ("The final answer is $\\boxed{42}$.", "42", "boxed"),
    ("\\boxed{x^2+1}", "x^2+1", "boxed"),
    ("\\boxed{\\text{(B)}}", "(B)", "boxed"),
    ("\\boxed{{1,000}}", "1000", "boxed"),
    ("So \\boxed{5} but earlier I wrote \\boxed{4}? No: \\boxed{6}", "6", "boxed"),
    # traps: numbers inside the reasoning must not win over an explicit marker
    ("#### 42\nWait, I double-checked with 3 apples.", "42", "hash"),
    ("Step 1: 12 * 3 = 36. The answer is 36. (checked 2 times)", "36", "answer_is"),
    ("I have 3 apples and 5 pears, so 8 in total.", "8", "last_number"),
    ("It costs −7 dollars", "-7", "last_number"),
    ("x = 2.50", "2.5", "last_number"),
    ("Version v1.2, then 3", "3", "last_number"),
    ("1/3 of them", "1/3", "last_number"),
    ("10 - 4", "4", "last_number"),  # a subtraction, not -4
    ("6 - 6 = ", "6", "last_number"),
    ("It costs -$5 and then $ 7", "7", "last_number"),
    ("<think>2+2=4 maybe 5</think> The answer is 4", "4", "answer_is"),
    ("<think>try 9</think> so it is 10", "10", "last_number"),
    ("<think>#### 3</think>", "3", "hash"),
]


@pytest.mark.parametrize(("text", "value", "method"), EXTRACTION_CASES)
def test_extract_answer(text, value, method):
    found = extract_answer(text)
    assert (found.value, found.method) == (value, method)
    assert 0 <= found.start < len(text)


@pytest.mark.parametrize("text", ["", "no answer here", "The answer is unknown", "#### ", "\\boxed{"])
def test_no_answer(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("12.0", "12"),
        ("$1,000", "1000"),
        ("12.", "12"),
        ("-0", "0"),
        ("0.50", "0.5"),
        ("−3", "-3"),
        ("\\frac{1}{2}", "0.5"),
        ("2/6", "1/3"),
        ("50\\%", "50"),
        ("\\text{ 7 }", "7"),
        ("x + 1", "x+1"),
        ("1,5", "1,5"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("predicted", "gold", "match"),
    [
        ("12", "12.00", True),
        ("0.5", "1/2", True),
        ("$1,234", "1234", True),
        ("-4", "4", False),
        (None, "4", False),
        ("x+1", "x + 1", True),
        ("1/3", "0.333", False),
        ("7", "7.", True),
    ],
)
def test_answers_match(predicted, gold, match):
    assert answers_match(predicted, gold) is match


def test_parse_number_is_exact():
    assert parse_number("0.1") * 3 == parse_number("0.3")
    assert parse_number("5/0") is None
    assert parse_number("abc") is None


def _boxed_by_scanning(text):
    """Every \\boxed{...} found by scanning forward from its brace, counting depth (the definition)."""
    spans, start = [], text.find("\\boxed{")
    while start != -1:
        depth, index = 1, start + len("\\boxed{")
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            spans.append((start, text[start + len("\\boxed{") : index - 1]))
        start = text.find("\\boxed{", start + 1)
    return spans


def test_boxed_spans_balance_braces_like_a_forward_scan_and_stay_linear_on_unclosed_boxes():
    rng = random.Random(0)
    pieces = ["\\boxed{", "{", "}", "x", "1", " "]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert boxed_spans(text) == _boxed_by_scanning(text), text
    assert boxed_spans("\\boxed{" * 50_000 + "\\boxed{42}") == [(7 * 50_000, "42")]  # a forward scan per box would take 10^9 steps
