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


@dataclass(frozen=True, slots=True)
class Ranked:
    candidate: Candidate
    score: float
    reason: str


def score(c: Candidate) -> float:
    s = STATUS_PENALTY[c.status]
    s += min(MAX_REPORT_PENALTY, REPORT_PENALTY * c.open_reports)
    s += min(LATENCY_CAP_MS, c.latency_ms or 0.0) / 10
    if c.local:
        s += LOCAL_BONUS
    return s


def explain(c: Candidate) -> str:
    parts = ["this node holds a verified copy"] if c.local else []
    st = c.status.value
    if c.status in (MirrorStatus.DOWN, MirrorStatus.DEGRADED) and c.status_reason:
        st += f" ({c.status_reason})"
    parts.append(st)
    if c.latency_ms is not None:
        parts.append(f"{c.latency_ms:.0f} ms")
    parts.append(
        "no open reports" if not c.open_reports else f"{c.open_reports} open report{'s' * (c.open_reports > 1)}"
    )
    return ", ".join(parts)


def rank(candidates: Iterable[Candidate]) -> list[Ranked]:
    """Best first; ties keep the given order (the configured origin preference)."""
    scored = [Ranked(c, score(c), explain(c)) for c in candidates]
    return sorted(scored, key=lambda r: r.score)


def magnet(infohash: str, name: str, web_seeds: Iterable[str] = (), peers: Iterable[str] = ()) -> str:
    params: list[tuple[str, str]] = [("xt", f"urn:btih:{infohash}"), ("dn", name)]
    params += [("ws", u) for u in web_seeds]
    params += [("x.pe", p) for p in peers]
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
            "score": round(r.score, 1),
            "reason": r.reason,
        }
        for i, r in enumerate(ranked)
    ]


def cache_url(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{quote(key)}"
