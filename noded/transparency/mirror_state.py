"""The up / degraded / down state of one mirror, from a sequence of probe outcomes (pure).

Hysteresis keeps one lost packet from flapping a mirror: a mirror that was up turns `degraded` at its
first failure and `down` only after `fail_threshold` failures in a row; a `down` mirror needs
`success_threshold` successes in a row before it is `up` again. A slow but correct answer makes a
mirror `degraded` at once (it works, but a client should prefer another), without counting towards
`down`. Wrong content is a failure: a mirror that serves the wrong bytes must not stay `up`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class MirrorStatus(enum.StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one probe found."""

    ok: bool  # reachable and, where checked, the content matched
    latency_ms: float | None
    reason: str  # why not ok, or what was checked when ok
    slow: bool = False  # ok, but slower than the configured threshold


@dataclass(frozen=True, slots=True)
class MirrorState:
    status: MirrorStatus = MirrorStatus.UNKNOWN
    reason: str = "not probed yet"
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    last_latency_ms: float | None = None
    last_probe: float | None = None
    last_success: float | None = None
    last_failure_reason: str | None = None


def advance(
    state: MirrorState, outcome: Outcome, now: float, *, fail_threshold: int, success_threshold: int
) -> MirrorState:
    """The state after one more probe outcome."""
    if outcome.ok:
        successes = state.successes + 1
        base = replace(
            state,
            failures=0,
            successes=successes,
            last_latency_ms=outcome.latency_ms,
            last_probe=now,
            last_success=now,
        )
        if state.status is MirrorStatus.DOWN and successes < success_threshold:
            why = state.last_failure_reason or "earlier failures"
            return replace(
                base, reason=f"recovering: {successes}/{success_threshold} successes in a row (last failure: {why})"
            )
        if outcome.slow:
            return replace(base, status=MirrorStatus.DEGRADED, reason=f"slow: {outcome.reason}")
        return replace(base, status=MirrorStatus.UP, reason=outcome.reason)

    failures = state.failures + 1
    base = replace(
        state,
        failures=failures,
        successes=0,
        last_latency_ms=outcome.latency_ms,
        last_probe=now,
        last_failure_reason=outcome.reason,
    )
    if failures >= fail_threshold:
        return replace(base, status=MirrorStatus.DOWN, reason=f"{outcome.reason} ({failures} failures in a row)")
    if state.status is MirrorStatus.DOWN:
        return replace(base, reason=outcome.reason)
    return replace(
        base,
        status=MirrorStatus.DEGRADED,
        reason=f"{outcome.reason} ({failures}/{fail_threshold} failures before down)",
    )
