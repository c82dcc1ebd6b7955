"""Mathematical equivalence of two answers through ``math-verify``, safe in every thread.

``math-verify`` (the grader of lighteval, open-r1 and TRL's examples) parses LaTeX and plain
expressions into SymPy and compares them: ``2\\sqrt{3}`` equals ``\\sqrt{12}``, ``(x+1)^2`` equals
``x^2+2x+1``, ``[0, 3)`` is not ``(0, 3]``. Its time limits use ``signal.alarm``, which only works
in a process's main thread, and without them a tower such as ``10^{10^{10}}`` never finishes. So:

- in the main thread (training steps, evaluation, DataLoader worker processes) it runs here, with
  its signal time limits;
- in any other thread it runs in one helper process (started on first use), which has its own main
  thread and so its own time limits; threads take turns, a helper that does not answer in time is
  killed and the pair counts as different, and one that died is started again.

math-verify's alarm replaces any ``SIGALRM`` timer of the calling program while it runs (and cancels
it afterwards): a program with its own alarm should grade from another thread.

>>> math_equal("2\\\\sqrt{3}", "\\\\sqrt{12}"), math_equal("(0, 3]", "[0, 3)")
(True, False)
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from importlib.metadata import version

#: Seconds ``math-verify`` may spend parsing one answer, and again comparing two.
TIME_LIMIT_S = 5
#: How long another thread waits for the helper process (both limits, twice, plus its start-up);
#: one comparison runs at a time, so the wait is that comparison's alone.
HELPER_WAIT_S = 4 * TIME_LIMIT_S + 60
#: Parsed answers kept per process (oldest dropped first).
PARSE_CACHE_SIZE = 4096
_parse_cache: dict[str, tuple] = {}
_helper: ProcessPoolExecutor | None = None
_helper_lock = threading.Lock()

# math-verify logs each time limit it hits as a warning and each parse failure at debug level;
# an answer that cannot be parsed is simply not equal, so only its errors are shown.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@lru_cache(maxsize=1)
def _math_verify() -> tuple:
    """math-verify's ``parse``, ``verify`` and extraction targets, imported on first use (SymPy and
    the LaTeX parser take a second to import; most processes never compare LaTeX)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    return parse, verify, [LatexExtractionConfig(), ExprExtractionConfig()]


def grader_record() -> dict[str, str]:
    """What graded the answers, for ``metrics.json`` and reports."""
    return {
        "name": "ipg_lightning answers + math-verify",
        "math_verify_version": version("math-verify"),
        "extraction": "last of \\boxed{}, '####', 'The answer is'; else the last number; after the last </think> first",
        "numbers": "compared exactly as fractions (0.5 = 1/2, 0.333 != 1/3)",
        "expressions": "math-verify: LaTeX and plain expressions, sets, intervals, matrices, equations",
        "choices": "a gold answer that is one capital letter (A-J) is matched by letter",
    }


def _as_math(answer: str) -> str:
    """An answer as math-verify finds it best: inside ``$...$`` unless it already has delimiters."""
    stripped = answer.strip()
    if stripped.startswith(("$", "\\(", "\\[")) or "\\boxed" in stripped:
        return stripped
    return f"${stripped}$"


def _parsed(answer: str) -> tuple:
    """The parsed form of one answer, cached when parsing succeeded (a gold answer is compared with
    many completions; an answer that failed, e.g. by running out of time, is tried again)."""
    cached = _parse_cache.get(answer)
    if cached is None:
        parse, _, targets = _math_verify()
        cached = tuple(parse(_as_math(answer), targets, parsing_timeout=TIME_LIMIT_S))
        if cached:
            if len(_parse_cache) >= PARSE_CACHE_SIZE:
                _parse_cache.pop(next(iter(_parse_cache)))
            _parse_cache[answer] = cached
    return cached


def _clear_local_cache() -> None:
    _parse_cache.clear()


def clear_parse_cache() -> None:
    """Forget the parsed answers, here and in the helper process if one runs (benchmarks time the first parse)."""
    _clear_local_cache()
    with _helper_lock:
        if _helper is not None:
            try:
                _helper.submit(_clear_local_cache).result(timeout=HELPER_WAIT_S)
            except (FutureTimeout, BrokenProcessPool):
                _drop_helper()  # a fresh helper starts with an empty cache


def _equal_here(predicted: str, gold: str) -> bool:
    """Compare in this thread, which must be its process's main thread (signal time limits)."""
    gold_parsed, predicted_parsed = _parsed(gold), _parsed(predicted)
    if not gold_parsed or not predicted_parsed:
        return False
    _, verify, _ = _math_verify()
    return bool(verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=TIME_LIMIT_S))


def _helper_pool() -> ProcessPoolExecutor:
    global _helper
    if _helper is None:
        _helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _helper


def _drop_helper() -> None:
    """Kill the helper process (one that hangs or died) so the next call starts a fresh one."""
    global _helper
    pool, _helper = _helper, None
    if pool is not None:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def _equal_in_helper(predicted: str, gold: str) -> bool:
    """Compare in the helper process. One comparison at a time (the lock), so the wait is its own
    time only; a helper that hangs is killed (not equal), one that died is started again once."""
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "math-verify grading outside the main thread needs a helper process, and this daemonic process "
            "cannot start one: grade in the process's main thread"
        )
    with _helper_lock:
        for _ in range(2):
            try:
                return _helper_pool().submit(_equal_here, predicted, gold).result(timeout=HELPER_WAIT_S)
            except FutureTimeout:
                _drop_helper()
                return False
            except BrokenProcessPool:
                _drop_helper()
        return False


def math_equal(predicted: str, gold: str) -> bool:
    """True if ``math-verify`` finds ``predicted`` and ``gold`` mathematically equal (within its time
    limits; an answer it cannot parse is not equal). Works in any thread."""
    if threading.current_thread() is threading.main_thread():
        return _equal_here(predicted, gold)
    return _equal_in_helper(predicted, gold)
