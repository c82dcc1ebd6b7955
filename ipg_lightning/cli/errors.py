"""One-line error messages for the ``ipg`` command line.

The command-line parser wraps a bad value in several layers of union and class-path diagnostics;
an error raised inside a command may be the consequence of an earlier one. :func:`error_message`
finds the error that names the problem (the root of the exception chain) and, for a value the
parser rejected, the option it belongs to, and puts both on one line.

>>> error_message(ValueError("steps must be >= 1, got 0"))
'steps must be >= 1, got 0'
>>> try:
...     try:
...         raise ValueError("Expected a <class 'int'>. Got value: abc")
...     except ValueError as inner:
...         raise TypeError('Parser key "data.num_test": invalid value') from inner
... except TypeError as outer:
...     error_message(outer)
"--data.num_test: expected int, got 'abc'"
"""

from __future__ import annotations

import re
from argparse import ArgumentError
from collections.abc import Iterator

#: Set to 1 to see full tracebacks from the ``ipg`` command (the same as ``--debug``).
DEBUG_ENV = "IPG_DEBUG"
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_REQUIRED = re.compile(r"^the following arguments are required: (?P<names>.+)$")
_EXPECTED = re.compile(r"^Expected a (?:typing\.Literal\[(?P<choices>.*)\]|(?P<type>.+?))\. Got value: (?P<value>.*)$")
# Exception types whose message is written for users; others are prefixed with their type name.
_USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, ArgumentError)


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from (``raise ... from cause``), down to the root.

    Only explicit causes are followed: an error raised while another was being handled is the news,
    not the one it replaced.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _option(chain: list[BaseException]) -> str | None:
    """The dotted option a parser error refers to, from its ``Parser key "..."`` lines."""
    keys: list[str] = []
    for error in chain:
        match = _PARSER_KEY.match(str(error))
        if match and not (keys and keys[-1].endswith(match[1])):
            keys.append(match[1])
    return ".".join(keys) or None


def error_message(error: BaseException) -> str:
    """One line that names what went wrong (and the option, for a value the parser rejected)."""
    chain = list(exception_chain(error))
    root = chain[-1]
    text = root.args[0] if isinstance(root, KeyError) and root.args else str(root)
    text = _one_line(_CLASS.sub(r"\1", str(text))) or type(root).__name__
    required = _REQUIRED.match(text)
    if required:  # the parser names them by their dotted keys, e.g. "export.output_dir"
        names = [name.strip().split(".", 1)[-1] for name in required["names"].split(",")]
        return f"missing required option{'s' if len(names) > 1 else ''}: {', '.join('--' + name for name in names)}"
    option = _option(chain)
    if option is not None and text.startswith(("Expected", "Does not validate", "Not a valid")):
        expected = _EXPECTED.match(text)
        if expected is not None:
            wanted = f"one of {expected['choices']}" if expected["choices"] else expected["type"]
            return f"--{option}: expected {wanted}, got {expected['value']!r}"
        return f"--{option}: {text[0].lower()}{text[1:]}"
    if not isinstance(root, _USER_ERRORS):
        return f"{type(root).__name__}: {text}"
    return text
