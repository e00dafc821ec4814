"""Ansible filter `noded_toml`: a dict mirroring config.example.toml -> TOML text.

JSON strings, numbers and arrays of scalars are valid TOML values, so scalars are written with
json.dumps; tables and arrays of tables get their own headers. Values TOML cannot hold (None, nested
arrays of tables inside arrays) are refused with the key that holds them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_-]+\Z")


def _string(s: str) -> str:
    # JSON escapes the control characters TOML forbids raw, except DEL; \u escapes of characters
    # beyond the BMP would be surrogate pairs, which TOML refuses, so those stay literal.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _key(k: object) -> str:
    s = str(k)
    return s if _BARE.match(s) else _string(s)


def _is_table_array(v: object) -> bool:
    return (
        isinstance(v, Sequence)
        and not isinstance(v, str | bytes)
        and len(v) > 0
        and all(isinstance(x, Mapping) for x in v)
    )


def _value(path: str, v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return json.dumps(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Sequence) and not isinstance(v, bytes):
        return "[" + ", ".join(_value(path, x) for x in v) + "]"
    raise ValueError(f"noded_toml: {path} has a value TOML cannot hold: {v!r}")


def _table(prefix: str, data: Mapping[str, Any], header: str | None, out: list[str]) -> None:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    if header is not None:
        out.append("")
        out.append(header)
    for k, v in scalars:
        out.append(f"{_key(k)} = {_value(prefix + _key(k), v)}")
    for k, v in data.items():
        name = prefix + _key(k)
        if isinstance(v, Mapping):
            _table(name + ".", v, f"[{name}]", out)
    for k, v in data.items():
        name = prefix + _key(k)
        if _is_table_array(v):
            for item in v:
                _table(name + ".", item, f"[[{name}]]", out)


def noded_toml(data: Mapping[str, Any]) -> str:
    if not isinstance(data, Mapping):
        raise ValueError("noded_toml: expected a mapping")
    out: list[str] = []
    _table("", data, None, out)
    return "\n".join(out).lstrip("\n") + "\n"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"noded_toml": noded_toml}
