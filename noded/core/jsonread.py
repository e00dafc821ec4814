"""One bounded reader for every JSON document that comes from outside (API bodies, peers, catalogues).

`loads` refuses, with one typed error, what the standard parser would accept but should not be trusted
with: bodies over a byte cap, nesting deeper than a cap (the stdlib parser recurses and a deep document
raises RecursionError, which callers do not expect), numbers with more digits than a cap (big ints cost
quadratic time and raise a plain ValueError past 4300 digits; huge floats become infinity), NaN and
Infinity (not JSON), bytes that are not UTF-8 and escaped lone surrogates (they cannot be written back
as UTF-8, so they fail later, far from the input). Pure: no I/O.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["too_large", "too_deep", "number", "encoding", "malformed"]


class JsonInputError(ValueError):
    """A document refused by `loads`; `kind` says why, `too_large` tells callers to answer 413."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def too_large(self) -> bool:
        return self.kind == "too_large"


@dataclass(frozen=True, slots=True)
class JsonLimits:
    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_number_chars: int = 40  # a sign, 20 digits of int64, a fraction and an exponent fit


# A JSON string, unrolled so a long string is one linear scan, not one alternation per character.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)


def _depth(text: str) -> int:
    """The deepest nesting in `text`. Exact for valid JSON and for the valid prefix of invalid JSON (the
    part the parser reads before it fails), which is all the parser could recurse into."""
    if text.count("[") + text.count("{") <= 1:
        return 1
    brackets = _NOT_BRACKET.sub("", _STRING.sub('""', text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _has_lone_surrogate(value: Any) -> bool:
    """Walks a parsed document (its depth is already bounded) for strings that are not valid Unicode."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def loads(raw: bytes | str, limits: JsonLimits = JsonLimits(), what: str = "JSON body") -> Any:
    """The document in `raw`, or JsonInputError. Never raises anything else."""
    if len(raw) > limits.max_bytes:
        raise JsonInputError("too_large", f"{what} too large (limit {limits.max_bytes} bytes)")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonInputError("encoding", f"{what} is not valid UTF-8 (byte {e.start})") from None
    else:
        text = raw
        if _has_lone_surrogate(text):
            raise JsonInputError("encoding", f"{what} is not valid Unicode (lone surrogate)")
    if text.startswith("\ufeff"):
        text = text[1:]
    depth = _depth(text)
    if depth > limits.max_depth:
        raise JsonInputError("too_deep", f"{what} is nested {depth} deep, more than {limits.max_depth}")
    cap = limits.max_number_chars

    def parse_int(s: str) -> int:
        if len(s) > cap:
            raise JsonInputError("number", f"{what} has a number of {len(s)} characters, more than {cap}")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > cap:
            raise JsonInputError("number", f"{what} has a number of {len(s)} characters, more than {cap}")
        f = float(s)
        if not math.isfinite(f):
            raise JsonInputError("number", f"{what} has a number out of range: {s[:cap]}")
        return f

    def parse_constant(s: str) -> Any:
        raise JsonInputError("number", f"{what} has {s}, which is not JSON")

    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except JsonInputError:
        raise
    except json.JSONDecodeError as e:
        raise JsonInputError("malformed", f"{what}: malformed JSON: {e.msg} at position {e.pos}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # belt and braces: the checks above should cover these
        raise JsonInputError("malformed", f"{what}: unreadable JSON: {type(e).__name__}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise JsonInputError("encoding", f"{what} has a string with a lone surrogate (\\ud800-\\udfff alone)")
    return value
