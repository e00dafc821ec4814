"""`noded demo`: one command brings up a local origin and two nodes that see it and each other.

The replication itself needs the origins and P2P components; until they are on the branch the demo
must still start everything, report each node's mirrors, stop cleanly and leave no process behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, noded_env


def test_demo_starts_origin_and_two_nodes_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "noded",
            "demo",
            "--items",
            "2",
            "--size",
            "256KiB",
            "--timeout",
            "90",
            "--no-wait",
            "--dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        env=noded_env(),
        cwd=ROOT,
        timeout=180,
    )
    out = res.stdout
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"toronto ready; dashboard http://127\.0\.0\.1:\d+/", out)
    assert re.search(r"amsterdam ready; dashboard http://127\.0\.0\.1:\d+/", out)
    # Each node probes the demo origin and its peer: both come up within the wait.
    # Each node probes the origin and its peer (the peer may still be starting: degraded, not down).
    assert re.search(r"toronto: \d/2 cached, mirrors \[zenodo up, amsterdam (up|degraded)\]", out), out
    assert re.search(r"amsterdam: \d/2 cached, mirrors \[zenodo up, toronto (up|degraded)\]", out), out
    assert "every dataset is on both nodes" in out
    # Fetched once from the origin, replicated peer to peer (counted at the origin).
    assert re.search(r"the origin served (\d+) bytes to pulls for \1 bytes of datasets \(1\.00x", out), out
    assert sorted(p.name for p in (work / "origin").iterdir()) == ["demo-dataset-1.bin", "demo-dataset-2.bin"]
    for name in ("toronto", "amsterdam"):
        log = (work / name / "noded.log").read_text()
        assert '"event": "daemon.stopped"' in log  # stopped gracefully, not killed


def test_demo_rejects_bad_arguments() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "noded", "demo", "--size", "lots"], capture_output=True, text=True, env=noded_env()
    )
    assert res.returncode == 2 and "--size" in res.stderr
