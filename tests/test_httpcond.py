"""The pure HTTP rules: range parsing, If-Range, preconditions, multipart layout."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from noded.core.httpcond import (
    MAX_RANGES,
    Validators,
    if_range_allows,
    multipart_plan,
    parse_etags,
    parse_ranges,
    precondition,
)

V = Validators('"abc-10"', 1_700_000_000)
LM = formatdate(V.last_modified, usegmt=True)


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, [(0, 9)]),
        ("bytes=0-9,20-29", 100, [(0, 9), (20, 29)]),
        ("bytes=20-29, 0-9", 100, [(0, 9), (20, 29)]),  # sorted
        ("bytes=0-9,10-19", 100, [(0, 19)]),  # adjacent merged
        ("bytes=0-50,10-19", 100, [(0, 50)]),  # contained merged
        ("bytes=-10", 100, [(90, 99)]),
        ("bytes=-1000", 100, [(0, 99)]),
        ("bytes=90-", 100, [(90, 99)]),
        ("bytes=90-500", 100, [(90, 99)]),
        ("BYTES=1-1", 100, [(1, 1)]),
        ("bytes=0-9,200-300", 100, [(0, 9)]),  # the unsatisfiable one is dropped
        ("bytes=100-", 100, []),  # nothing satisfiable: 416
        ("bytes=-0", 100, []),
        ("bytes=0-0", 0, []),
        ("bytes=10-5", 100, None),  # invalid: ignored
        ("bytes=abc", 100, None),
        ("bytes=-", 100, None),
        ("bytes=", 100, None),
        ("items=0-5", 100, None),
        ("bytes 0-5", 100, None),
        ("bytes=0-1," * (MAX_RANGES + 1), 100, None),  # too many: ignored
    ],
)
def test_parse_ranges(header: str | None, size: int, want: list[tuple[int, int]] | None) -> None:
    assert parse_ranges(header, size) == want


def test_if_range_is_strong() -> None:
    assert if_range_allows(None, V)
    assert if_range_allows('"abc-10"', V)
    assert not if_range_allows('"other"', V)
    assert not if_range_allows('W/"abc-10"', V)
    assert if_range_allows(LM, V)
    assert not if_range_allows(formatdate(V.last_modified + 1, usegmt=True), V)
    assert not if_range_allows(formatdate(V.last_modified - 1, usegmt=True), V)
    assert not if_range_allows("garbage", V)


def test_preconditions() -> None:
    assert precondition({}, V) is None
    assert precondition({"If-None-Match": '"abc-10"'}, V) == 304
    assert precondition({"If-None-Match": 'W/"abc-10"'}, V) == 304  # weak comparison
    assert precondition({"If-None-Match": '"x", "abc-10"'}, V) == 304
    assert precondition({"If-None-Match": "*"}, V) == 304
    assert precondition({"If-None-Match": '"x"'}, V) is None
    # If-None-Match present: If-Modified-Since is not looked at.
    assert precondition({"If-None-Match": '"x"', "If-Modified-Since": LM}, V) is None
    assert precondition({"If-Modified-Since": LM}, V) == 304
    assert precondition({"If-Modified-Since": formatdate(V.last_modified - 1, usegmt=True)}, V) is None
    assert precondition({"If-Modified-Since": "garbage"}, V) is None
    assert precondition({"If-Match": '"abc-10"'}, V) is None
    assert precondition({"If-Match": 'W/"abc-10"'}, V) == 412  # strong comparison
    assert precondition({"If-Match": '"x"'}, V) == 412
    assert precondition({"If-Unmodified-Since": formatdate(V.last_modified - 1, usegmt=True)}, V) == 412
    assert precondition({"If-None-Match": '"abc-10"'}, V, method="POST") == 412


def test_parse_etags() -> None:
    assert parse_etags('"a", W/"b" ,"c,d"') == (False, [(False, '"a"'), (True, '"b"'), (False, '"c,d"')])
    assert parse_etags("*") == (True, [])
    assert parse_etags("abc") is None


def test_multipart_length_is_exact() -> None:
    plan = multipart_plan([(0, 9), (20, 29)], 100, "application/octet-stream", "B")
    data = bytes(range(100))
    body = b"".join(h + data[a : b + 1] for h, a, b in plan.parts) + plan.trailer
    assert len(body) == plan.length
    assert body.startswith(b"--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-9/100\r\n\r\n")
    assert body.endswith(b"\r\n--B--\r\n")
    assert plan.content_type == "multipart/byteranges; boundary=B"
