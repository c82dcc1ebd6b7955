"""Final-answer extraction and normalisation, following GSM8K and MATH conventions.

Explicit markers are ``#### n`` (GSM8K), ``The answer is n`` and ``\\boxed{...}`` (MATH); the one
that appears last in the text wins. Without a marker, the last number in the text is the answer.
When the text has a ``</think>`` block, the answer is looked for after it first.

Two answers match when they are the same number (compared exactly, as fractions), the same choice
letter (a gold answer ``A``-``J``), or mathematically equal by ``math-verify``
(:mod:`~ipg_lightning.rewards.equivalence`): ``\\sqrt{12}`` and ``2\\sqrt{3}``, ``(x+1)^2`` and
``x^2+2x+1``, ``\\text{(C)}`` and ``C``. :func:`is_correct` grades a whole completion.

>>> extract_answer("3 + 4 = 7, then 7 * 2 = 14\\n#### 14").value
'14'
>>> extract_answer("So the answer is $1,250.00.").value
'1250'
>>> answers_match("0.50", "1/2"), answers_match("x^2+2x+1", "(x+1)^2")
(True, True)
>>> is_correct("<think>half of it</think> The answer is $\\\\dfrac12$.", "\\\\frac{1}{2}")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from ipg_lightning.rewards.equivalence import math_equal

THINK_END = "</think>"

# a sign touches its number ("-4", "-$4"); "10 - 4" is a subtraction whose last number is 4
_NUMBER = r"(?:[-−]\$?|\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?|[-−]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_HASH_RE = re.compile(r"####\s*(?P<value>[^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(?P<value>[^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_NOISE_RE = re.compile(r"\\(?:left|right|!|,|;|:|\s)|\^\\circ|\^\{\\circ\}|\\%|%|\\\$|\$")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_MATH_SPAN_RE = re.compile(r"\$\$(?P<a>.+?)\$\$|\$(?P<b>[^$]+?)\$|\\\((?P<c>.+?)\\\)|\\\[(?P<d>.+?)\\\]")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+(?:\s*\{[^{}]*\})?")
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # two words in a row: dollars in prose, not math
_CHOICE_RE = re.compile(r"\(?(?P<letter>[A-J])\)?(?![\w])")
_CHOICE_ONLY_RE = re.compile(r"[\s(\[{]*(?P<letter>[A-J])[\s)\]}.:]*")


@dataclass(frozen=True)
class ExtractedAnswer:
    """A final answer found in a completion.

    Args:
        value: the normalised answer (see :func:`normalize_answer`).
        start: character index where the answer's marker (or the bare number) starts.
        method: which convention found it: ``hash``, ``answer_is``, ``boxed`` or ``last_number``.
        text: the answer as written (the box's content, the math after "The answer is", the
            number), which :func:`answers_match` compares; defaults to ``value``.
    """

    value: str
    start: int
    method: str
    text: str = ""

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", self.value)


def boxed_spans(text: str) -> list[tuple[int, str]]:
    """``(start, content)`` of every ``\\boxed{...}`` in ``text``, braces balanced."""
    spans = []
    for match in _BOXED_RE.finditer(text):
        depth, index = 1, match.end()
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth == 0:
            spans.append((match.start(), text[match.end() : index - 1]))
    return spans


def _first_number(segment: str) -> str | None:
    match = _NUMBER_RE.search(segment)
    return match.group(0) if match else None


def _segment_answer(segment: str) -> str | None:
    """The answer written after a marker: its first math span (``$...$``), else its first number,
    else a choice letter that opens it (``(B)``, ``C.``)."""
    span = _MATH_SPAN_RE.search(segment)
    content = next(part for part in span.groups() if part is not None).strip() if span else ""
    if content and not _PROSE_RE.search(_LATEX_COMMAND_RE.sub(" ", content)):
        return content
    number = _first_number(_FRAC_RE.sub(r"\1/\2", segment))
    if number is not None:
        return number
    choice = _CHOICE_RE.match(segment.strip())
    return choice["letter"] if choice else None


def _marker_candidates(text: str, offset: int) -> list[ExtractedAnswer]:
    found = []
    for start, content in boxed_spans(text):
        value = normalize_answer(content)
        if value:
            found.append(ExtractedAnswer(value, offset + start, "boxed", content.strip()))
    for pattern, method in ((_HASH_RE, "hash"), (_ANSWER_IS_RE, "answer_is")):
        for match in pattern.finditer(text):
            segment = match["value"]
            if method == "answer_is" and _BOXED_RE.search(segment):
                continue  # the \boxed{} inside this sentence is its own candidate
            answer = _segment_answer(segment)
            if answer is not None and normalize_answer(answer):
                found.append(ExtractedAnswer(normalize_answer(answer), offset + match.start(), method, answer))
    return found


def extract_answer(text: str) -> ExtractedAnswer | None:
    """Find the final answer in ``text``; None if there is no marker and no number at all."""
    think_end = text.rfind(THINK_END)
    regions = [(text[think_end + len(THINK_END) :], think_end + len(THINK_END))] if think_end >= 0 else []
    regions.append((text, 0))
    for region, offset in regions:
        candidates = _marker_candidates(region, offset)
        if candidates:
            return max(candidates, key=lambda answer: answer.start)
        numbers = list(_NUMBER_RE.finditer(region))
        if numbers:
            last = numbers[-1]
            return ExtractedAnswer(normalize_answer(last.group(0)), offset + last.start(), "last_number")
    return None


def parse_number(text: str) -> Fraction | None:
    """Parse ``-1,234.50``, ``$12``, ``3/4``, ``\\frac{3}{4}``, ``12.`` into an exact Fraction, else None.

    >>> parse_number("$1,234.50")
    Fraction(2469, 2)
    """
    cleaned = _FRAC_RE.sub(r"(\1)/(\2)", text.strip())
    cleaned = _LATEX_NOISE_RE.sub("", cleaned).replace("−", "-").replace(" ", "").rstrip(".")
    cleaned = cleaned.replace("(", "").replace(")", "")
    if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|-?\.\d+", cleaned):
        return Fraction(cleaned.replace(",", ""))
    match = re.fullmatch(r"(-?\d+)/(-?\d+)", cleaned)
    if match and int(match[2]) != 0:
        return Fraction(int(match[1]), int(match[2]))
    return None


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # a finite decimal: print it exactly, without trailing zeros
        digits = 0
        while (value * 10**digits).denominator != 1:
            digits += 1
        return f"{float(value):.{digits}f}"
    return f"{value.numerator}/{value.denominator}"


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: numbers exactly (``12.0`` -> ``12``, ``$1,000`` -> ``1000``,
    ``\\frac{1}{2}`` -> ``0.5``), anything else with LaTeX noise and whitespace removed.

    >>> normalize_answer("\\\\text{ 12.0 }")
    '12'
    """
    text = _TEXT_RE.sub(r"\1", text.strip())
    while text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    number = parse_number(text)
    if number is not None:
        return _format_number(number)
    text = _FRAC_RE.sub(r"\1/\2", text)
    return _LATEX_NOISE_RE.sub("", text).replace(" ", "").rstrip(".")


def choice_letter(answer: str) -> str | None:
    """The choice letter an answer consists of (``C``, ``(C)``, ``\\text{(C)}``, ``C.``), else None.

    >>> choice_letter("\\\\text{(C)}"), choice_letter("C"), choice_letter("x")
    ('C', 'C', None)
    """
    text = _TEXT_RE.sub(r"\1", answer.replace("$", ""))
    match = _CHOICE_ONLY_RE.fullmatch(text)
    return match["letter"] if match else None


def answers_match(predicted: str | None, gold: str) -> bool:
    """True if ``predicted`` is ``gold``: the same number (exactly), the same choice letter when the
    gold answer is one, else mathematically equal by ``math-verify``."""
    if predicted is None or not predicted.strip():
        return False
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return choice_letter(predicted) == gold_letter
    left, right = normalize_answer(predicted), normalize_answer(gold)
    left_number, right_number = parse_number(left), parse_number(right)
    if left_number is not None and right_number is not None:
        return left_number == right_number
    return left == right or math_equal(predicted, gold)


def is_correct(completion: str, gold: str) -> bool:
    """True if the final answer found in ``completion`` (:func:`extract_answer`) matches ``gold``."""
    found = extract_answer(completion)
    return answers_match(found.text if found else None, gold)
