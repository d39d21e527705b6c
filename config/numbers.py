"""Whole numbers from people and URLs: the ASCII digits 0-9 only.

Python's int() reads far more than an operator types: Arabic-Indic '٤', full-width and
mathematical digits, '1_6' and '+4' are all numbers to it, so a count or an id read with int()
resolved '٣' as object 3. Every count and id that comes from a form, a URL, a query string, a
command line or the environment is read here instead.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"-?[0-9]+", re.ASCII)
_UNSIGNED_DIGITS = re.compile(r"[0-9]+", re.ASCII)
# Far beyond any id or count, and far below the 4300 digits where int() gives up with its own error.
MAX_DIGITS = 100


def shown(value: object) -> str:
    """The value as an error message quotes it: short, quoted, control characters escaped."""
    text = str(value)
    return repr(text[:24] + "…") if len(text) > 24 else repr(text)


def parse_ascii_int(value: object, *, what: str, example: str = "4", signed: bool = False) -> int:
    """Read a whole number written with the digits 0-9 (and a leading '-' if signed); whitespace around is ignored.

    Raises ValueError whose message names `what`, the fix and the value, e.g. "The count must be
    written with the digits 0-9, like 4; got '٤'."
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else None
    pattern = _DIGITS if signed else _UNSIGNED_DIGITS
    if text is None or not pattern.fullmatch(text):
        raise ValueError(f"{what} must be written with the digits 0-9, like {example}; got {shown(value)}.")
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"{what} has too many digits (at most {MAX_DIGITS}); got {shown(value)}.")
    return int(text)


def is_ascii_int(value: object) -> bool:
    """Whether parse_ascii_int reads the value as an unsigned whole number."""
    try:
        parse_ascii_int(value, what="")
    except ValueError:
        return False
    return True
