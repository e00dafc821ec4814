"""structlog set-up: JSON lines on stdout for journald, a console renderer on a TTY.

Secrets are scrubbed by a processor that runs last before rendering: any registered secret value is
replaced wherever it appears (even inside an exception text or a URL), and keys that name a secret
are masked whatever their value.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_SECRETS: set[str] = set()
_SECRET_KEY_RE = re.compile(r"(secret|password|token|authorization|access_key|credential)", re.I)
MASK = "***"


def register_secret(value: str | None) -> None:
    """Never print this value. Short values are skipped to avoid masking common words."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, MASK)
    return text


def _scrub_value(v: Any) -> Any:
    if isinstance(v, str):
        return scrub(v)
    if isinstance(v, dict):
        return {k: (MASK if _SECRET_KEY_RE.search(str(k)) and v2 else _scrub_value(v2)) for k, v2 in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_scrub_value(x) for x in v)
    if isinstance(v, int | float | bool) or v is None:
        return v
    return scrub(str(v))


def _scrub_processor(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        v = event[k]
        if _SECRET_KEY_RE.search(k) and v and k != "event":
            event[k] = MASK
        else:
            event[k] = _scrub_value(v)
    return event


def configure(fmt: str = "auto", level: str = "info", secrets: Iterable[str | None] = ()) -> None:
    for s in secrets:
        register_secret(s)
    json_out = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_out:
        renderer: Any = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, _scrub_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # No fixed file: each logger writes to the sys.stdout of its time (tests swap it).
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (boto3, aiohttp access log) go through the same scrubber.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
    for h in logging.getLogger().handlers:
        h.addFilter(_StdlibScrubber())


class _StdlibScrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        return True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
