"""Which noded runs on a state directory, and on which ports.

A running daemon writes `<state_dir>/noded.instance` (a random instance id, its pid and the addresses it
listens on) once it serves, and removes it when it stops; `/healthz` answers the same id. Tools that
must not mistake the daemon's own ports for a conflict (`noded check-config`) read the file and ask
`/healthz`: only a live daemon answering that id counts, so a file left by a crash proves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "noded.instance"
PROBE_TIMEOUT = 2.0


def new_instance_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    pid: int
    listens: dict[str, tuple[str, int]]  # config key ("api.port", "http_mirror.port") -> (bind, port)


def path_of(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def write(state_dir: Path, inst: Instance) -> None:
    """Blocking. Atomic: a reader sees the old file or the new one."""
    p = path_of(state_dir)
    tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
    body = {"id": inst.id, "pid": inst.pid, "listens": {k: list(v) for k, v in inst.listens.items()}}
    tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def remove(state_dir: Path, inst_id: str) -> None:
    """Blocking. Only our own record (another daemon may have taken the directory since)."""
    got = read(state_dir)
    if got is not None and got.id == inst_id:
        with contextlib.suppress(OSError):
            path_of(state_dir).unlink()


def read(state_dir: Path) -> Instance | None:
    try:
        raw: Any = json.loads(path_of(state_dir).read_text(encoding="utf-8"))
        listens = {str(k): (str(v[0]), int(v[1])) for k, v in raw["listens"].items()}
        return Instance(str(raw["id"]), int(raw["pid"]), listens)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def base_url(bind: str, port: int) -> str:
    """http://host:port of a listener; one on every address is reached on loopback."""
    host = bind
    if bind in ("0.0.0.0", ""):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    elif bind == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def running(state_dir: Path) -> Instance | None:
    """Blocking. The daemon running on this state directory, when its API answers with its id."""
    inst = read(state_dir)
    if inst is None or "api.port" not in inst.listens:
        return None
    url = base_url(*inst.listens["api.port"]) + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as r:  # noqa: S310 - http://, built above
            body: Any = json.loads(r.read(4096))
    except (OSError, ValueError):
        return None
    return inst if isinstance(body, dict) and body.get("instance") == inst.id else None
