"""The package layout's import contracts (pyproject.toml, run by `./dev lint`) hold on the tree, and
break when a layer imports upwards or two siblings import each other.

Each case copies the package into a temporary directory, adds one import line, and runs the real
`lint-imports` over the copy with the project's own contracts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = "cli -> daemon -> api -> stages -> core BROKEN"
ACYCLIC = "no import cycles between sibling modules or packages BROKEN"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (./dev lint)")


def _lint_copy(tmp_path: Path, edits: dict[str, str]) -> subprocess.CompletedProcess[str]:
    shutil.copytree(ROOT / "noded", tmp_path / "noded", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for rel, line in edits.items():
        path = tmp_path / "noded" / rel
        path.write_text(path.read_text() + "\n" + line + "\n")
    # The copy, not the installed package, must be the one analysed.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_tree_keeps_its_contracts(tmp_path: Path) -> None:
    r = _lint_copy(tmp_path, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # core must not know the stages
        ("core/units.py", "import noded.cache.layout  # noqa", LAYERS),
        # a stage must not reach up into the API
        ("cache/eviction.py", "import noded.api.app  # noqa", LAYERS),
        # the two delivery stages are independent of each other
        ("r2/partsize.py", "import noded.p2p.torrent  # noqa", LAYERS),
        # siblings inside one stage: eviction is imported by db, so db imported back makes a cycle
        ("cache/eviction.py", "import noded.cache.db  # noqa", ACYCLIC),
    ],
)
def test_a_reverse_import_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    r = _lint_copy(tmp_path, {module: line})
    assert r.returncode != 0
    assert broken in r.stdout, r.stdout + r.stderr
