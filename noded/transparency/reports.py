"""Community reports of broken mirrors and corrupt files: validation (pure) and their rows in the store.

Rate limits count the client's reports in the store, so they hold across restarts. A `corrupt` report
about an item this node holds queues that copy for re-verification (`verify_queue`) in the same
transaction as the report; the verifier takes rows from there (`pending_verifications`) and clears them
(`finish_verification`).
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from noded.core.model import State
from noded.core.store import Store

KINDS = ("unreachable", "slow", "corrupt", "missing", "other")
STATUSES = ("open", "resolved", "dismissed")
MAX_DETAIL_BYTES = 1024
MAX_CONTACT_CHARS = 256
MAX_KEY_CHARS = 1024
MAX_RESOLUTION_CHARS = 1024
FIELDS = frozenset({"mirror", "item", "kind", "detail", "contact"})


class ReportInvalid(ValueError):
    """The request is not a valid report; the message says which field and why."""


class RateLimited(Exception):
    def __init__(self, retry_after: int, limit: int, scope: str = "from one client") -> None:
        super().__init__(f"at most {limit} reports per hour {scope}; retry in {retry_after} s")
        self.retry_after = retry_after


class TooManyOpen(Exception):
    pass


@dataclass(frozen=True, slots=True)
class NewReport:
    mirror: str
    kind: str
    detail: str
    item: str | None = None
    contact: str | None = None


def _text(v: Any, field: str, max_chars: int | None = None, max_bytes: int | None = None) -> str:
    if not isinstance(v, str):
        raise ReportInvalid(f"{field} must be a string")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in v):
        raise ReportInvalid(f"{field} contains control characters")
    if max_chars is not None and len(v) > max_chars:
        raise ReportInvalid(f"{field} is longer than {max_chars} characters")
    if max_bytes is not None and len(v.encode()) > max_bytes:
        raise ReportInvalid(f"{field} is longer than {max_bytes} bytes (UTF-8)")
    return v


def validate_report(body: Any, mirrors: Collection[str]) -> NewReport:
    """A report from an untrusted JSON body, or ReportInvalid naming the first problem."""
    if not isinstance(body, dict):
        raise ReportInvalid("expected a JSON object with mirror, kind and optional item, detail, contact")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ReportInvalid(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    mirror = _text(body.get("mirror"), "mirror", max_chars=100) if "mirror" in body else None
    if not mirror:
        raise ReportInvalid("mirror is required")
    if mirror not in mirrors:
        raise ReportInvalid(f"unknown mirror {mirror!r}; known: {sorted(mirrors)}")
    kind = body.get("kind")
    if kind not in KINDS:
        raise ReportInvalid(f"kind must be one of {list(KINDS)}, got {kind!r}")
    detail = _text(body.get("detail", ""), "detail", max_bytes=MAX_DETAIL_BYTES)
    item = body.get("item")
    if item is not None:
        item = _text(item, "item", max_chars=MAX_KEY_CHARS).strip().lstrip("/")
        if not item or ".." in item.split("/"):
            raise ReportInvalid("item must be an item key such as 'census/2021/da.parquet'")
    contact = body.get("contact")
    if contact is not None:
        contact = _text(contact, "contact", max_chars=MAX_CONTACT_CHARS).strip() or None
    if kind == "corrupt" and item is None:
        raise ReportInvalid("a corrupt report needs the item key")
    return NewReport(mirror=mirror, kind=kind, detail=detail, item=item, contact=contact)


# -- store (run on the store thread) --------------------------------------------------------------


def insert_report(
    store: Store,
    rep: NewReport,
    client: str,
    *,
    per_hour: int,
    max_open: int,
    per_hour_total: int | None = None,
    now: float | None = None,
) -> tuple[int, int | None]:
    """Store a report. Returns (report id, id of the item queued for re-verification or None).

    Limited per client address and, since addresses are cheap, for all clients together."""
    now = time.time() if now is None else now
    with store.tx() as c:
        recent = c.execute(
            "SELECT COUNT(*), MIN(created_at) FROM reports WHERE client = ? AND created_at > ?",
            (client, now - 3600),
        ).fetchone()
        if recent[0] >= per_hour:
            raise RateLimited(max(1, int(recent[1] + 3600 - now) + 1), per_hour)
        if per_hour_total is not None:
            total = c.execute(
                "SELECT COUNT(*), MIN(created_at) FROM reports WHERE created_at > ?", (now - 3600,)
            ).fetchone()
            if total[0] >= per_hour_total:
                raise RateLimited(max(1, int(total[1] + 3600 - now) + 1), per_hour_total, "from all clients")
        if c.execute("SELECT COUNT(*) FROM reports WHERE status = 'open'").fetchone()[0] >= max_open:
            raise TooManyOpen(f"{max_open} reports are open already; try again once some are handled")
        rid = c.execute(
            "INSERT INTO reports(mirror, item_key, kind, detail, contact, client, status, created_at) "
            "VALUES(?,?,?,?,?,?,'open',?)",
            (rep.mirror, rep.item, rep.kind, rep.detail, rep.contact, client, now),
        ).lastrowid
        assert rid is not None
        verify_id: int | None = None
        if rep.kind == "corrupt" and rep.item:
            item = store.get_current(rep.item)
            if item is not None and item.state is State.CACHED:
                c.execute(
                    "INSERT INTO verify_queue(item_id, reason, report_id, requested_at) VALUES(?,?,?,?) "
                    "ON CONFLICT(item_id) DO NOTHING",
                    (item.id, f"corrupt report #{rid} on {rep.mirror}", rid, now),
                )
                verify_id = item.id
        return int(rid), verify_id


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    keys = ("id", "mirror", "item", "kind", "detail", "status", "created_at", "resolved_at", "resolution")
    return dict(zip(keys, r, strict=True))


def list_reports(
    store: Store,
    *,
    mirror: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    item: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first. Contact and client are never listed: they are for the operator's eyes only."""
    q = "SELECT id, mirror, item_key, kind, detail, status, created_at, resolved_at, resolution FROM reports WHERE 1=1"
    args: list[Any] = []
    for col, v in (("mirror", mirror), ("status", status), ("kind", kind), ("item_key", item)):
        if v is not None:
            q += f" AND {col} = ?"
            args.append(v)
    if before_id is not None:
        q += " AND id < ?"
        args.append(before_id)
    q += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return [_row(r) for r in store.conn.execute(q, args)]


def get_report(store: Store, rid: int) -> dict[str, Any] | None:
    r = store.conn.execute(
        "SELECT id, mirror, item_key, kind, detail, status, created_at, resolved_at, resolution FROM reports "
        "WHERE id = ?",
        (rid,),
    ).fetchone()
    return None if r is None else _row(r)


def moderate(store: Store, rid: int, status: str, resolution: str, now: float | None = None) -> dict[str, Any] | None:
    """Resolve or dismiss a report; None if there is no such report."""
    if status not in ("resolved", "dismissed"):
        raise ReportInvalid(f"cannot set status {status!r}")
    now = time.time() if now is None else now
    with store.tx() as c:
        n = c.execute(
            "UPDATE reports SET status = ?, resolved_at = ?, resolution = ? WHERE id = ?",
            (status, now, resolution, rid),
        ).rowcount
        return get_report(store, rid) if n else None


def open_counts(store: Store) -> dict[str, int]:
    return dict(store.conn.execute("SELECT mirror, COUNT(*) FROM reports WHERE status = 'open' GROUP BY mirror"))


# -- the re-verification queue (for noded/verify.py) ----------------------------------------------


def pending_verifications(store: Store, limit: int = 100) -> list[tuple[int, str]]:
    """(item id, reason) of copies waiting to be re-verified, oldest request first."""
    return [
        (int(i), str(r))
        for i, r in store.conn.execute(
            "SELECT item_id, reason FROM verify_queue ORDER BY requested_at LIMIT ?", (limit,)
        )
    ]


def finish_verification(store: Store, item_id: int) -> None:
    with store.tx() as c:
        c.execute("DELETE FROM verify_queue WHERE item_id = ?", (item_id,))
