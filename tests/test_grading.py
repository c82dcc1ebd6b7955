"""Grading MATH-style answers: a table of cases written from the MATH answer conventions, checked
against the expected verdict and against math-verify run on its own; grading in threads and workers."""

import threading
import time

import pytest
import torch
from math_verify import parse, verify
from torch.utils.data import DataLoader, Dataset

from ipg_lightning.rewards import equivalence
from ipg_lightning.rewards.answers import answers_match, choice_letter, extract_answer, is_correct

# (completion, gold, a careful grader's verdict)
GRADING_CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac12", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{\sqrt{12}}", r"2\sqrt3", True),
    (r"\boxed{(1, 2)}", "(1,2)", True),
    (r"\boxed{(2, 1)}", "(1,2)", False),
    (r"\boxed{[0, 3)}", "[0,3)", True),
    (r"\boxed{(0, 3]}", "[0,3)", False),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x^2+1}", "(x+1)^2", False),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{\text{(C)}}", "C", True),
    (r"\boxed{10^{6}}", "1000000", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"<think>so 3</think> The answer is $\dfrac12$.", r"\frac{1}{2}", True),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", False),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{1/3}", "0.333", False),
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{3, 5}", "5, 3", True),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    (r"\boxed{-\frac{3}{4}}", "-0.75", True),
    (r"\boxed{\frac{-3}{4}}", r"-\frac34", True),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{\infty}", r"\infty", True),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", True),
    (r"\boxed{2x}", "2y", False),
    (r"\boxed{\$12.50}", "12.5", True),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", True),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt2}{2}", True),
    (r"\boxed{1.5}", r"\frac{3}{2}", True),
    (r"\boxed{1.50}", "1.5", True),
    (r"\boxed{12}", "13", False),
    (r"\boxed{y=2x+3}", "y = 2x + 3", True),
    (r"\boxed{\text{Monday}}", r"\text{Monday}", True),
    (r"\boxed{\text{Tuesday}}", r"\text{Monday}", False),
    (r"So $\boxed{7}$. Wait, that is wrong: the answer is $\boxed{8}$.", "8", True),
    (r"\boxed{\sqrt{2}+1}", r"1+\sqrt{2}", True),
    (r"\boxed{12.566}", r"4\pi", False),
    (r"\boxed{30^{\circ}}", r"30^\circ", True),
    (r"\boxed{\frac{9}{4}\pi}", r"\frac{9\pi}{4}", True),
    (r"The answer is (B).", "B", True),
    (r"\boxed{B}", "B", True),
    (r"The answer is (A).", "B", False),
    ("so the total is 1,234\n#### 1,234", "1234", True),
    ("She pays $18 in all. The answer is 18.", "18", True),
    (r"\boxed{x \in [1, 2]}", "[1,2]", True),
    (r"\boxed{\dfrac{7}{2}}", "3.5", True),
    (r"\boxed{-2}", "2", False),
    (r"The final answer is $x^2 - 4$.", "(x-2)(x+2)", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", False),
]
# Traps in where the answer is: each was graded wrongly by an earlier version of the extraction.
EXTRACTION_TRAPS = [
    ("The answer is 3, not $5$.", "5", False),  # the number the line opens with, not a later span
    ("The final answer is 3 (check: $x=5$ fails).", "5", False),
    ("The answer is 5 because $x = 2$ gives 5.", "5", True),
    ("Therefore, the answer is $\\$18$.", "18", True),  # an escaped dollar sign inside math
    ("#### $\\$18$", "18", True),
    ("The answer is $40 - $10 = $30.", "30", True),  # dollars in an equation: its result
    ("The answer is $40 - $10 = $30.", "40", False),
    ("The answer is 5. Hmm, no, the answer is 7.", "7", True),  # the last marker wins, on one line too
    ("The answer is 5. Hmm, no, the answer is 7.", "5", False),
    ("The answer is \\boxed{5}. Wait, actually the answer is 7", "7", True),
    ("\\boxed{3(2)}", "32", False),  # a product, not the digits 3 and 2
    ("\\boxed{0.3333333}", "\\frac13", False),  # a rounded decimal is not the fraction
    ("10 - 4", "-4", False),  # a subtraction, not a negative number
    ("The answer is (B) 3.2 eV", "B", True),  # choices: the letter, not the number after it
    ("The answer is (B) $2\\times 10^{-3}$ m", "B", True),
    ("**Answer:** B", "B", True),
    ("The answer is **(B)**", "B", True),
    ("The answer is I think (C).", "C", True),
    ("The answer is A little more careful check needed.", "A", False),  # a word, not a choice
    ("Option B looks right, but the answer is (D).", "B", False),
    ("The answer is -\\frac{1}{2}.", "1/2", False),  # the sign of a fraction written without $
    ("The answer is -\\frac{1}{2}.", "-1/2", True),
    ("The answer is \\sqrt{2}.", "2", False),  # an expression written without $, not its first digit
    ("The answer is 2\\sqrt{3}.", "\\sqrt{12}", True),
    ("Answer: 20 + 4 = 24", "20", False),  # an arithmetic line's result, not its first term
    ("Answer: 20 + 4 = 24", "24", True),
]
CHOICE_GOLDS = {"B"}  # math-verify's default extraction does not read "(B)"; graded by letter here


@pytest.mark.parametrize(("completion", "gold", "expected"), EXTRACTION_TRAPS)
def test_extraction_traps(completion, gold, expected):
    assert is_correct(completion, gold) is expected


def test_a_comma_list_is_not_a_thousands_number():
    assert not answers_match("-1125", "-1, 125") and answers_match("3, 5", "5, 3") and answers_match("1,125", "1125")


def test_the_table_is_large_enough_and_balanced():
    verdicts = [expected for _, _, expected in GRADING_CASES]
    assert len(GRADING_CASES) >= 40 and 10 <= verdicts.count(False) <= len(verdicts) - 25


@pytest.mark.parametrize(("completion", "gold", "expected"), GRADING_CASES)
def test_grading_matches_a_careful_grader(completion, gold, expected):
    assert is_correct(completion, gold) is expected


@pytest.mark.parametrize(("completion", "gold", "expected"), [case for case in GRADING_CASES if case[1] not in CHOICE_GOLDS])
def test_grading_agrees_with_math_verify_alone(completion, gold, expected):
    """Independent: math-verify's own extraction of the whole completion, compared with the gold."""
    assert bool(verify(parse(f"${gold}$"), parse(completion))) is is_correct(completion, gold)


def test_answer_text_keeps_latex_for_equivalence():
    found = extract_answer("so the result is \\boxed{\\frac{\\sqrt{3}}{2}}")
    assert (found.method, found.text) == ("boxed", "\\frac{\\sqrt{3}}{2}")
    found = extract_answer("The answer is $(1, 2)$.")
    assert (found.method, found.text) == ("answer_is", "(1, 2)")
    # a dollar amount in prose is a number, not a math span
    found = extract_answer("The answer is $12, which is $3 more than before.")
    assert (found.value, found.text) == ("12", "$12")


@pytest.mark.parametrize(
    ("answer", "letter"), [("C", "C"), ("(C)", "C"), ("\\text{(C)}", "C"), ("C.", "C"), ("$B$", "B"), ("c", None), ("CD", None), ("x", None)]
)
def test_choice_letter(answer, letter):
    assert choice_letter(answer) == letter


def test_choice_gold_is_graded_by_letter_only():
    assert answers_match("\\text{(D)}", "D") and not answers_match("4", "D") and not answers_match("D", "4")


def _grade_all() -> list[bool]:
    return [is_correct(completion, gold) for completion, gold, _ in GRADING_CASES]


def test_grading_in_other_threads_gives_the_same_verdicts():
    """math-verify's signal time limits fail outside the main thread (and it then says 'not equal'
    without a word); here every verdict must be the same as in the main thread."""
    equivalence.clear_parse_cache()
    results = {}
    threads = [threading.Thread(target=lambda index=index: results.update({index: _grade_all()})) for index in range(3)]
    for thread in threads:  # several at once: they take turns on the one helper process
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [results[index] for index in range(3)] == [[expected for _, _, expected in GRADING_CASES]] * 3


class _Completions(Dataset):
    def __len__(self) -> int:
        return len(GRADING_CASES)

    def __getitem__(self, index: int) -> torch.Tensor:
        completion, gold, _ = GRADING_CASES[index]
        return torch.tensor(is_correct(completion, gold))


def test_grading_in_dataloader_workers_gives_the_same_verdicts():
    loader = DataLoader(_Completions(), batch_size=8, num_workers=2)
    verdicts = torch.cat(list(loader)).tolist()
    assert verdicts == [expected for _, _, expected in GRADING_CASES]


def test_a_runaway_answer_times_out_in_a_thread_too():
    """A tower such as 10^{10^{10}} never finishes without a time limit; in a thread the helper
    process enforces math-verify's own limits."""
    results = {}
    start = time.monotonic()
    thread = threading.Thread(target=lambda: results.update(verdict=answers_match("10^{10^{10}}", "1")))
    thread.start()
    thread.join(timeout=equivalence.HELPER_WAIT_S + 30)
    elapsed = time.monotonic() - start
    assert results == {"verdict": False} and equivalence.TIME_LIMIT_S <= elapsed < equivalence.HELPER_WAIT_S


def _in_thread(function):
    results = {}
    thread = threading.Thread(target=lambda: results.update(value=function()))
    thread.start()
    thread.join(timeout=120)
    return results["value"]


def test_a_helper_process_that_died_is_started_again():
    assert _in_thread(lambda: answers_match("2\\sqrt{3}", "\\sqrt{12}"))
    for process in list(equivalence._helper._processes.values()):  # as if the OS had killed it
        process.kill()
        process.join()
    assert _in_thread(lambda: answers_match("(x+1)^2", "x^2+2x+1"))
