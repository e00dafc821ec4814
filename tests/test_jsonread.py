"""The bounded JSON reader: what it accepts reads as the stdlib reads it; anything else is JsonInputError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noded.core.jsonread import JsonInputError, JsonLimits, loads

LIMITS = JsonLimits(max_bytes=1 << 20, max_depth=16, max_number_chars=40)
JSONISH = '[]{}",:0123456789.eE-+ \\ud800natrulfs'

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
documents = st.recursive(
    scalars | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_what_the_limits_allow_reads_like_the_stdlib(doc: Any) -> None:
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # the strategy made a lone surrogate: refused, not read
        with pytest.raises(JsonInputError):
            loads(raw, JsonLimits(max_bytes=1 << 20, max_depth=100))
        return
    # Generated documents are never nested 100 deep; their numbers fit 40 characters.
    assert loads(raw, JsonLimits(max_bytes=1 << 20, max_depth=100)) == json.loads(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400) | st.text(alphabet=JSONISH, max_size=400).map(str.encode))
def test_any_bytes_give_a_document_or_json_input_error(raw: bytes) -> None:
    try:
        loads(raw, LIMITS)
    except JsonInputError as e:
        assert e.kind in ("too_large", "too_deep", "number", "encoding", "malformed")


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[" * 17 + b"]" * 17, "too_deep"),
        (b'{"a": ' * 17 + b"1" + b"}" * 17, "too_deep"),
        (b'["[[[[[[[[[[[[[[[[[[[[[[["]', None),  # brackets inside strings are text
        (b"1" * 41, "number"),
        (b"-1.5e99999", "number"),
        (b"[Infinity]", "number"),
        (b'"\\udc00"', "encoding"),
        (b'"\\ud83d\\ude00"', None),  # a surrogate pair is one character
        (b'"\\\\ud800"', None),  # an escaped backslash, then the letters "ud800"
        (b"\xef\xbb\xbf[1]", None),  # a UTF-8 byte order mark
        (b"\xc3\x28", "encoding"),
        (b"x" * ((1 << 20) + 1), "too_large"),
        (b"", "malformed"),
    ],
)
def test_edges(raw: bytes, kind: str | None) -> None:
    if kind is None:
        loads(raw, LIMITS)
        return
    with pytest.raises(JsonInputError) as ei:
        loads(raw, LIMITS)
    assert ei.value.kind == kind
