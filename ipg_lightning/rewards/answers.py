"""Final-answer extraction and normalisation, following GSM8K and MATH conventions.

Explicit markers are ``#### n`` (GSM8K), ``The answer is n`` and ``\\boxed{...}`` (MATH); the one
that appears last in the text wins. Without a marker, the last number in the text is the answer.
When the text has a ``</think>`` block, the answer is looked for after it first.

>>> extract_answer("3 + 4 = 7, then 7 * 2 = 14\\n#### 14").value
'14'
>>> extract_answer("So the answer is $1,250.00.").value
'1250'
>>> answers_match("0.50", "1/2")
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

THINK_END = "</think>"

_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?|[-−]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_HASH_RE = re.compile(r"####\s*(?P<value>[^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(?P<value>[^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_NOISE_RE = re.compile(r"\\(?:left|right|!|,|;|:|\s)|\^\\circ|\^\{\\circ\}|\\%|%|\\\$|\$")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


@dataclass(frozen=True)
class ExtractedAnswer:
    """A final answer found in a completion.

    Args:
        value: the normalised answer (see :func:`normalize_answer`).
        start: character index where the answer's marker (or the bare number) starts.
        method: which convention found it: ``hash``, ``answer_is``, ``boxed`` or ``last_number``.
    """

    value: str
    start: int
    method: str


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


def _marker_candidates(text: str, offset: int) -> list[ExtractedAnswer]:
    found = []
    for start, content in boxed_spans(text):
        value = normalize_answer(content)
        if value:
            found.append(ExtractedAnswer(value, offset + start, "boxed"))
    for pattern, method in ((_HASH_RE, "hash"), (_ANSWER_IS_RE, "answer_is")):
        for match in pattern.finditer(text):
            segment = match["value"]
            if method == "answer_is" and _BOXED_RE.search(segment):
                continue  # the \boxed{} inside this sentence is its own candidate
            number = _first_number(_FRAC_RE.sub(r"\1/\2", segment))
            if number is not None:
                found.append(ExtractedAnswer(normalize_answer(number), offset + match.start(), method))
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


def answers_match(predicted: str | None, gold: str) -> bool:
    """True if ``predicted`` equals ``gold`` after normalisation (numbers compared exactly)."""
    if predicted is None:
        return False
    left, right = parse_number(normalize_answer(predicted)), parse_number(normalize_answer(gold))
    if left is not None and right is not None:
        return left == right
    return normalize_answer(predicted) == normalize_answer(gold)
