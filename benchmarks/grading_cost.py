"""What does grading cost: GSM8K-style numbers, MATH-style LaTeX through math-verify, and in a thread?

Grades the same completions, in one process and interleaved, medians of several repeats:

- GSM8K-style completions (reasoning lines ending in ``#### n``): the exact-number path;
- MATH-style completions (``\\boxed{...}`` with radicals, fractions, tuples, expressions) against
  gold answers written differently, which go to math-verify; first with a cold cache (each gold parsed
  once), then again (the gold parses cached, as when k samples of one problem are graded);
- the MATH-style set graded from another thread, which sends each comparison to the helper process
  (its cache cleared before each repeat, so this is the cold case there).

Also reports the tiny reasoner's evaluation time per completion, for scale.

    python benchmarks/grading_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from ipg_lightning.rewards import equivalence
from ipg_lightning.rewards.answers import is_correct

GSM8K = [(f"{a} + {b} = {a + b}\n{a + b} * 2 = {2 * (a + b)}\n#### {2 * (a + b)}", str(2 * (a + b))) for a in range(20) for b in range(10)]
MATH_PAIRS = [
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed{[0, 3)}", "(0,3]"),
    ("\\boxed{\\frac{9}{4}\\pi}", "\\frac{9\\pi}{4}"),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}"),
    ("\\boxed{y=2x+3}", "y = 2x + 3"),
]


def _math_set(copies: int) -> list[tuple[str, str]]:
    """MATH-style completions whose golds differ copy by copy (so the first pass parses each gold once)."""
    return [(f"We get {pred[:-1]}+{i}-{i}}}.", f"{gold}+{i}-{i}") for i in range(copies) for pred, gold in MATH_PAIRS]


def _grade(pairs: list[tuple[str, str]]) -> float:
    start = time.perf_counter()
    for completion, gold in pairs:
        is_correct(completion, gold)
    return (time.perf_counter() - start) / len(pairs) * 1e3


def _grade_in_thread(pairs: list[tuple[str, str]]) -> float:
    result = {}
    thread = threading.Thread(target=lambda: result.update(ms=_grade(pairs)))
    thread.start()
    thread.join()
    return result["ms"]


def main() -> None:
    """Time grading per completion; print medians (ms) and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=8, help="copies of the MATH-style set (8 pairs each)")
    args = parser.parse_args()
    math_pairs = _math_set(args.copies)
    assert all(is_correct(c, g) for c, g in GSM8K)
    _grade_in_thread(math_pairs[:1])  # start the helper process outside the timings
    times: dict[str, list[float]] = {"gsm8k": [], "math_cold": [], "math_cached": [], "math_in_thread": []}
    for _ in range(args.repeats):
        equivalence.clear_parse_cache()
        times["gsm8k"].append(_grade(GSM8K))
        times["math_cold"].append(_grade(math_pairs))
        times["math_cached"].append(_grade(math_pairs))
        times["math_in_thread"].append(_grade_in_thread(math_pairs))
    base = statistics.median(times["gsm8k"])
    print(f"{len(GSM8K)} GSM8K-style and {len(math_pairs)} MATH-style completions, {args.repeats} repeats, ms per completion (median, min-max)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:15s} {median:8.3f}  ({min(values):.3f}-{max(values):.3f})  {median / base:8.1f}x gsm8k")


if __name__ == "__main__":
    main()
