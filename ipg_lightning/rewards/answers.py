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
# a marker's answer runs to the end of its line or to the next marker, whichever comes first
_UNTIL_NEXT_MARKER = r"(?:(?!(?:final\s+)?answer\s*(?:is|:)|####|\\boxed|\\fbox)[^\n])*"
_HASH_RE = re.compile(rf"####\s*(?P<value>{_UNTIL_NEXT_MARKER})", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(rf"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(?P<value>{_UNTIL_NEXT_MARKER})", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\([dt]?frac)\s*(\d)\s*(\d)(?!\d)")  # \frac12, \dfrac 3 4 (not \frac123: that is 3/2)
_SIGNED_FRAC_RE = re.compile(r"(?P<sign>[-−]\s*)?\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
# a LaTeX expression written without $ after a marker: its first token that holds a command
_LATEX_TOKEN_RE = re.compile(r"[^\s$]*\\[A-Za-z]+[^\s$]*")
# "Answer: 20 + 4 = 24": an arithmetic line that opens the answer, whose result is the answer
_LEADING_EQUATION_RE = re.compile(rf"^\s*(?:[\d.,$+\-−*/×÷()\s]+=\s*)+(?P<result>{_NUMBER})")
_LATEX_NOISE_RE = re.compile(r"\\(?:left|right|!|,|;|:|\s)|\^\\circ|\^\{\\circ\}|\\%|%|\\\$|\$")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
# $...$, $$...$$, \(...\), \[...\]; an escaped \$ (a dollar sign) neither opens nor closes one
_MATH_SPAN_RE = re.compile(r"(?<!\\)\$\$(?P<a>.+?)(?<!\\)\$\$|(?<!\\)\$(?P<b>(?:\\\$|[^$])+?)(?<!\\)\$|\\\((?P<c>.+?)\\\)|\\\[(?P<d>.+?)\\\]")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+(?:\s*\{[^{}]*\})?")
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # two words in a row: dollars in prose, not math
_CUT_OFF_RE = re.compile(r"(?:[-+*/^=,(]|\\cdot|\\times|\\div)\s*$")  # "$40 - $10": an amount, not "40 -"
# a choice letter that opens an answer: "(B)", or "B" followed by ")", punctuation or the end
_CHOICE_START_RE = re.compile(r"\s*(?:\((?P<a>[A-J])\)|(?P<b>[A-J])(?=[).:,;]|\s*$))")
_CHOICE_IN_PARENS_RE = re.compile(r"\((?P<letter>[A-J])\)")
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
    if _BOXED_RE.search(text) is None:
        return []
    closing = _matching_braces(text)
    spans = []
    for match in _BOXED_RE.finditer(text):
        end = closing.get(match.end() - 1)
        if end is not None:
            spans.append((match.start(), text[match.end() : end]))
    return spans


def _matching_braces(text: str) -> dict[int, int]:
    """The position of the ``}`` that closes each ``{`` of ``text`` that is closed (one pass, so a text
    full of unclosed ``\\boxed{`` costs linear time)."""
    closing, opened = {}, []
    for index, char in enumerate(text):
        if char == "{":
            opened.append(index)
        elif char == "}" and opened:
            closing[opened.pop()] = index
    return closing


def _math_span(segment: str) -> tuple[int, str] | None:
    """The first ``$...$`` span of ``segment`` that holds an answer (not prose, not cut off)."""
    span = _MATH_SPAN_RE.search(segment)
    if span is None:
        return None
    content = next(part for part in span.groups() if part is not None).strip()
    if not content or _PROSE_RE.search(_LATEX_COMMAND_RE.sub(" ", content)) or _CUT_OFF_RE.search(content):
        return None
    return span.start(), content


def _first_number(segment: str) -> tuple[int, str] | None:
    """The first number of ``segment`` (a ``\\frac{a}{b}`` of two numbers, with its sign, counts as ``a/b``)."""
    found = [(match.start(), match.group(0)) for match in _NUMBER_RE.finditer(segment)][:1]
    for match in _SIGNED_FRAC_RE.finditer(segment):
        if parse_number(match[2]) is not None and parse_number(match[3]) is not None:
            found.append((match.start(), f"{'-' if match['sign'] else ''}{match[2]}/{match[3]}"))
            break
    return min(found) if found else None


def _latex_token(segment: str) -> tuple[int, str] | None:
    """The first whitespace-free run of ``segment`` that holds a LaTeX command (``2\\sqrt{3}.``), without
    trailing punctuation: an expression written without ``$``."""
    match = _LATEX_TOKEN_RE.search(segment)
    token = match.group(0).rstrip(".,;:") if match else ""
    return (match.start(), token) if token else None


def _opening_choice(segment: str) -> str | None:
    """A choice letter that opens ``segment`` (markdown and ``$`` removed): ``(B)``, ``B.``, ``B``."""
    match = _CHOICE_START_RE.match(_TEXT_RE.sub(r"\1", segment.replace("*", "").replace("$", "")))
    return (match["a"] or match["b"]) if match else None


def _segment_answer(segment: str) -> str | None:
    """The answer written after a marker: the result of an arithmetic line that opens it
    (``20 + 4 = 24``), else whichever comes first of a math span (``$...$``), a LaTeX expression and
    a number, else a choice letter that opens it (``(B)``, ``C.``)."""
    segment = segment.replace("*", "")  # markdown emphasis: "**Answer:** 5"
    equation = _LEADING_EQUATION_RE.match(segment)
    if equation is not None:
        return equation["result"]
    # in order of preference on a tie: the span and the expression hold the number that starts with them
    ranked = [(found[0], rank, found[1]) for rank, found in enumerate((_math_span(segment), _latex_token(segment), _first_number(segment))) if found]
    if ranked:
        return min(ranked)[2]
    return _opening_choice(segment)


def _marker_candidates(text: str, offset: int) -> list[ExtractedAnswer]:
    found = []
    for start, content in boxed_spans(text):
        value = normalize_answer(content)
        if value:
            found.append(ExtractedAnswer(value, offset + start, "boxed", content.strip()))
    for pattern, method in ((_HASH_RE, "hash"), (_ANSWER_IS_RE, "answer_is")):
        for match in pattern.finditer(text):
            answer = _segment_answer(match["value"])
            if answer is not None and normalize_answer(answer):
                found.append(ExtractedAnswer(normalize_answer(answer), offset + match.start(), method, answer))
    return found


def _regions(text: str) -> list[tuple[str, int]]:
    """Where to look for the answer, in order: after the last ``</think>`` (if any), then everywhere."""
    think_end = text.rfind(THINK_END)
    after = [(text[think_end + len(THINK_END) :], think_end + len(THINK_END))] if think_end >= 0 else []
    return [*after, (text, 0)]


def extract_answer(text: str) -> ExtractedAnswer | None:
    """Find the final answer in ``text``; None if there is no marker and no number at all."""
    for region, offset in _regions(text):
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
    cleaned = _FRAC_RE.sub(r"\1/\2", _FRAC_SHORT_RE.sub(r"\\\1{\2}{\3}", text.strip()))
    cleaned = _LATEX_NOISE_RE.sub("", cleaned).replace("−", "-").rstrip(".")
    if re.search(r",\s", cleaned):  # "1, 125" is a list of two numbers, not 1125
        return None
    cleaned = cleaned.replace(" ", "")
    while cleaned.startswith("(") and cleaned.endswith(")") and "," not in cleaned:  # "(5)", not "(1,234)" or "3(2)"
        cleaned = cleaned[1:-1]
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
    text = _FRAC_RE.sub(r"\1/\2", _FRAC_SHORT_RE.sub(r"\\\1{\2}{\3}", text))
    return re.sub(r"(?<!,)\s+", "", _LATEX_NOISE_RE.sub("", text)).rstrip(".")  # "1, 125" stays a list


def choice_letter(answer: str) -> str | None:
    """The choice letter an answer consists of (``C``, ``(C)``, ``\\text{(C)}``, ``C.``), else None.

    >>> choice_letter("\\\\text{(C)}"), choice_letter("C"), choice_letter("x")
    ('C', 'C', None)
    """
    text = _TEXT_RE.sub(r"\1", answer.replace("$", ""))
    match = _CHOICE_ONLY_RE.fullmatch(text)
    return match["letter"] if match else None


def _segment_choice(segment: str) -> str | None:
    """The choice a marker's segment gives: a letter that opens it, else its first ``(X)``."""
    opening = _opening_choice(segment)
    if opening is not None:
        return opening
    match = _CHOICE_IN_PARENS_RE.search(segment)
    return match["letter"] if match else None


def extract_choice(text: str) -> str | None:
    """The choice letter a completion settles on: the last ``\\boxed{C}``, ``The answer is (C)``,
    ``Answer: **C**`` or ``#### C`` (after the last ``</think>`` first); None without one.

    >>> extract_choice("Option B fits. The answer is (C) 3.2 eV"), extract_choice("The answer is A little unclear.")
    ('C', None)
    """
    for region, _ in _regions(text):
        found = [(start, letter) for start, content in boxed_spans(region) if (letter := choice_letter(content))]
        for pattern in (_HASH_RE, _ANSWER_IS_RE):
            found += [(match.start(), letter) for match in pattern.finditer(region) if (letter := _segment_choice(match["value"]))]
        if found:
            return max(found)[1]
    return None


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
    """True if the final answer found in ``completion`` matches ``gold``: the choice the completion
    settles on (:func:`extract_choice`) when the gold answer is a letter, else the answer
    :func:`extract_answer` finds."""
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return extract_choice(completion) == gold_letter
    found = extract_answer(completion)
    return answers_match(found.text if found else None, gold)
