"""Where an item can be fetched from, best first (pure ranking, and the list of candidate places).

The score is a penalty, lower is better: the mirror's status dominates (a `down` mirror goes last
whatever else), each open report adds as much as a step from `up` to `degraded` would, and latency
breaks ties among equals. Every place carries the reason for its rank in words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from noded.transparency.mirror_state import MirrorStatus

STATUS_PENALTY = {
    MirrorStatus.UP: 0.0,
    MirrorStatus.UNKNOWN: 200.0,
    MirrorStatus.DEGRADED: 300.0,
    MirrorStatus.DOWN: 10_000.0,
}
REPORT_PENALTY = 150.0  # per open report: two reports weigh about as much as being degraded
MAX_REPORT_PENALTY = 3_000.0  # reports alone never push a working mirror below a down one
LATENCY_CAP_MS = 5_000.0
LOCAL_BONUS = -50.0  # this node's own verified copy: no extra hop
# A report against this very copy (mirror + item) weighs far more than one against the mirror at large,
# and a copy known to differ (conflict, bad bytes) goes after every copy that may match.
ITEM_REPORT_PENALTY = 1_000.0
MAX_ITEM_REPORT_PENALTY = 3_000.0
MISMATCH_PENALTY = 5_000.0
MATCH_WORDS = {
    "match": "copy known to match",
    "unknown": "no published checksum to compare",
    "conflict": "publishes other content under this name",
    "suspect": "served bytes that did not verify",
    "superseded": "an older release of this dataset",
}
BAD_COPY = ("conflict", "suspect", "superseded")


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: str  # "node" (this node), "peer", "r2", "origin"
    mirror: str
    url: str | None
    status: MirrorStatus
    open_reports: int = 0
    latency_ms: float | None = None
    status_reason: str = ""
    local: bool = False
    bittorrent: str | None = None  # host:port for peers
    match: str = "unknown"  # "match" | "unknown" | "conflict" | "suspect" | "superseded" (see MATCH_WORDS)
    item_reports: int = 0  # open reports against this mirror's copy of this item, since its last clean probe
    note: str = ""  # e.g. the conflict or suspect reason

    @property
    def working(self) -> bool:
        """Worth handing to a client as a web seed: not down, not known bad, not reported."""
        return self.status != MirrorStatus.DOWN and self.match not in BAD_COPY and not self.item_reports


@dataclass(frozen=True, slots=True)
class Ranked:
    candidate: Candidate
    score: float
    reason: str


def score(c: Candidate) -> float:
    s = STATUS_PENALTY[c.status]
    s += min(MAX_REPORT_PENALTY, REPORT_PENALTY * c.open_reports)
    s += min(LATENCY_CAP_MS, c.latency_ms or 0.0) / 10
    s += min(MAX_ITEM_REPORT_PENALTY, ITEM_REPORT_PENALTY * c.item_reports)
    if c.match in BAD_COPY:
        s += MISMATCH_PENALTY
    if c.local:
        s += LOCAL_BONUS
    return s


def explain(c: Candidate) -> str:
    parts = []
    if c.local:
        parts.append("this node holds a verified copy" if c.match == "match" else "this node holds an unverified copy")
    st = c.status.value
    if c.status in (MirrorStatus.DOWN, MirrorStatus.DEGRADED) and c.status_reason:
        st += f" ({c.status_reason})"
    parts.append(st)
    if c.latency_ms is not None:
        parts.append(f"{c.latency_ms:.0f} ms")
    parts.append(
        "no open reports" if not c.open_reports else f"{c.open_reports} open report{'s' * (c.open_reports > 1)}"
    )
    if c.item_reports:
        parts.append(f"{c.item_reports} open report{'s' * (c.item_reports > 1)} against this copy")
    if not c.local:
        words = MATCH_WORDS.get(c.match, c.match)
        parts.append(f"{words} ({c.note})" if c.note else words)
    return ", ".join(parts)


def rank(candidates: Iterable[Candidate]) -> list[Ranked]:
    """Best first; ties keep the given order (the configured origin preference)."""
    scored = [Ranked(c, score(c), explain(c)) for c in candidates]
    return sorted(scored, key=lambda r: r.score)


def magnet(
    infohash: str,
    name: str,
    web_seeds: Iterable[str] = (),
    peers: Iterable[str] = (),
    trackers: Iterable[str] = (),
) -> str:
    """A magnet link (BEP 9): trackers as tr=, BEP 19 web seeds as ws=, peers (host:port) as x.pe=."""
    params: list[tuple[str, str]] = [("xt", f"urn:btih:{infohash}"), ("dn", name)]
    params += [("tr", t) for t in dict.fromkeys(trackers)]
    params += [("ws", u) for u in dict.fromkeys(web_seeds)]
    params += [("x.pe", p) for p in dict.fromkeys(peers)]
    return "magnet:?" + urlencode(params, safe=":/")


def origin_of(url: str, origins: Mapping[str, str]) -> str | None:
    """The configured origin (name -> base URL) a download URL belongs to."""
    for name, base in origins.items():
        if url.startswith(base.rstrip("/") + "/"):
            return name
    return None


def places(ranked: list[Ranked]) -> list[dict[str, Any]]:
    return [
        {
            "rank": i + 1,
            "kind": r.candidate.kind,
            "mirror": r.candidate.mirror,
            "url": r.candidate.url,
            "bittorrent": r.candidate.bittorrent,
            "status": r.candidate.status.value,
            "latency_ms": r.candidate.latency_ms,
            "open_reports": r.candidate.open_reports,
            "item_reports": r.candidate.item_reports,
            "match": r.candidate.match,
            "working": r.candidate.working,
            "score": round(r.score, 1),
            "reason": r.reason,
        }
        for i, r in enumerate(ranked)
    ]


def cache_url(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{quote(key)}"
