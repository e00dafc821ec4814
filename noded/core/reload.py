"""What a SIGHUP applies, key by key. Pure.

Every configuration key is either applied in place or needs a restart. A key whose change needs a
restart keeps its running value until the restart (so what the daemon does always matches what it
reports), and is reported again at every reload until then. A section named in `LIVE` covers every
key under it, except those under a prefix in `NOT_LIVE`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from noded.core.config import Config

LIVE = frozenset(
    {
        "log",  # the logger is reconfigured
        "schedule",  # the timetable is re-applied to every token bucket and to libtorrent
        "probe",  # targets rebuilt; the probe loop starts or stops with `enabled`; values read per round
        "reports",  # read per report
        "traffic",  # read per flush and per profile refresh
        "peers",  # peer sync and the traffic directory are rebuilt
        "seed_targets",  # offered to at once; read per round and by the traffic directory
        "origins",  # adapters rebuilt and refreshed at once; [origins.torrents] imported and withdrawn
        "api.cors_origins",  # read per request
        "http_mirror.strip_prefix",  # read per request
        "bittorrent.seed_target_interval",  # the offer loop wakes and uses the new interval
        "bittorrent.peer_poll_interval",  # the poll loop wakes and uses the new interval
    }
)
NOT_LIVE = frozenset(
    {
        "origins.inbox.dir",  # the inotify watch is set up at start
        "origins.inbox.enabled",
        "origins.r2",  # the R2 origin is opened at start
    }
)


def _under(key: str, prefixes: frozenset[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_live(key: str) -> bool:
    return _under(key, LIVE) and not _under(key, NOT_LIVE)


def _model_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[str]:
    """Every key of the configuration, dotted ("bittorrent.seed_target_interval"). A list or table of
    entries (`peers`, `schedule.slots`) is one key."""
    for name, field in model.model_fields.items():
        sub = _model_type(field.annotation)
        key = prefix + name
        if sub is not None:
            yield from config_keys(sub, key + ".")
        else:
            yield key


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if isinstance(a, BaseModel) and isinstance(b, BaseModel) and type(a) is type(b):
            out += changed_keys(a, b, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


def _get(model: BaseModel, key: str) -> Any:
    v: Any = model
    for part in key.split("."):
        v = getattr(v, part)
    return v


def _set(model: BaseModel, parts: list[str], value: Any) -> Any:
    head = parts[0]
    if len(parts) == 1:
        return model.model_copy(update={head: value})
    return model.model_copy(update={head: _set(getattr(model, head), parts[1:], value)})


def plan(running: Config, wanted: Config) -> tuple[Config, list[str], list[str]]:
    """(config to run with, keys applied, keys that need a restart). The config to run with is `wanted`
    with every restart-only key kept at its running value."""
    changed = changed_keys(running, wanted)
    applied = [k for k in changed if is_live(k)]
    restart = [k for k in changed if not is_live(k)]
    out = wanted
    for k in restart:
        out = _set(out, k.split("."), _get(running, k))
    return out, applied, restart
