"""Loop-lag percentiles in status follow the samples (computed once per sample, not once per request)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from noded.transparency.metrics import Metrics


def test_lag_percentiles_follow_new_samples() -> None:
    node: Any = SimpleNamespace()  # the sample window needs nothing of the node
    m = Metrics(node)
    assert m.lag_percentiles()["lag_samples"] == 0
    now = time.monotonic()
    for i in range(100):
        m.samples.append((now, 0.001 * (i + 1)))
    first = m.lag_percentiles()
    assert first["lag_samples"] == 100 and first["lag_max_ms"] == 100.0
    first["lag_max_ms"] = -1.0  # the caller's copy: the next answer is not affected
    assert m.lag_percentiles()["lag_max_ms"] == 100.0
    m.samples.append((time.monotonic(), 0.5))
    second = m.lag_percentiles()
    assert second["lag_samples"] == 101 and second["lag_max_ms"] == 500.0
