"""The deployment files without a booted system: the units under systemd-analyze, the role's
templates rendered by Ansible in both scopes, the TOML filter, ansible-lint. The booted end-to-end
tests are in tests/e2e/."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noded.core.config import parse_config
from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "noded.service"
USER_UNIT = ROOT / "systemd" / "noded-user.service"
ANSIBLE_DIR = ROOT / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "noded"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory" / "example" / "hosts.yml"


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _exposure(output: str) -> float:
    line = next(ln for ln in output.splitlines() if "Overall exposure level" in ln)
    return float(line.split(":")[1].split()[0])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_unit_verifies_and_exposure_is_at_most_2(tmp_path: Path) -> None:
    # verify wants ExecStart= to exist: point it at this checkout's noded, change nothing else.
    exe = tmp_path / "noded"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m noded "$@"\n')
    exe.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/noded/venv/bin/noded " in text
    unit = tmp_path / "noded.service"
    unit.write_text(text.replace("ExecStart=/opt/noded/venv/bin/noded ", f"ExecStart={exe} "))
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    s = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True
    )
    exposure = _exposure(s.stdout)
    print(f"systemd-analyze security --offline=true systemd/noded.service: exposure {exposure}")
    assert exposure <= 2.0


def test_unit_carries_the_required_directives() -> None:
    lines = {ln.split("=", 1)[0] for ln in UNIT.read_text().splitlines() if "=" in ln and not ln.startswith("#")}
    required = {
        "Type", "WatchdogSec", "Restart", "RestartPreventExitStatus", "User", "ProtectSystem", "ReadWritePaths",
        "NoNewPrivileges", "PrivateTmp", "ProtectHome", "RestrictAddressFamilies", "SystemCallFilter",
        "CapabilityBoundingSet", "LoadCredential", "LimitNOFILE",
    }  # fmt: skip
    assert required <= lines, required - lines
    assert "RestartPreventExitStatus=78" in UNIT.read_text()


def _render(tmp_path: Path, inventory: Path, target: str, *extra: str) -> Path:
    playbook = _tool("ansible-playbook")
    if not playbook:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run(
        [
            playbook, "-i", str(inventory), str(ROOT / "tests/deploy/render.yml"),
            "-e", f"out={out}", "-e", f"templates={ROLE / 'templates'}", "-e", f"target={target}",
            "--skip-tags", "always", *extra,
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return out


def test_role_renders_the_shipped_unit_with_its_defaults(tmp_path: Path) -> None:
    """systemd/noded.service is what the role installs with its defaults and all three secrets set."""
    inv = tmp_path / "inventory.yml"
    host = {"noded_api_token": "t" * 20, "noded_r2_access_key_id": "k" * 20, "noded_r2_secret_access_key": "s" * 40}
    inv.write_text(json.dumps({"all": {"children": {"smart_nodes": {"hosts": {"node1": host}}}}}))
    out = _render(tmp_path, inv, "node1")
    rendered = (out / "node1-noded.service").read_text().splitlines(keepends=True)
    assert rendered[0].startswith("# Ansible managed")
    assert "".join(rendered[1:]) == UNIT.read_text()


def _user_render(tmp_path: Path) -> Path:
    inv = tmp_path / "inventory.yml"
    host = {
        "noded_scope": "user", "ansible_user": "operator",
        "noded_api_token": "t" * 20, "noded_r2_access_key_id": "k" * 20, "noded_r2_secret_access_key": "s" * 40,
    }  # fmt: skip
    inv.write_text(json.dumps({"all": {"children": {"smart_nodes": {"hosts": {"node1": host}}}}}))
    return _render(tmp_path, inv, "node1")


def test_role_renders_the_shipped_user_unit_with_its_defaults(tmp_path: Path) -> None:
    """systemd/noded-user.service is what the role installs in user scope with its defaults and three secrets."""
    out = _user_render(tmp_path)
    rendered = (out / "node1-noded-user.service").read_text().splitlines(keepends=True)
    assert rendered[0].startswith("# Ansible managed")
    assert "".join(rendered[1:]) == USER_UNIT.read_text()
    cfg = out / "node1-config.toml"
    c = parse_config(cfg.read_text(), cfg)
    assert str(c.paths.cache_dir) == "/home/operator/.cache/noded"
    assert str(c.paths.state_dir) == "/home/operator/.local/state/noded"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in text.splitlines():
        if "=" in ln and not ln.startswith(("#", "[")):
            k, v = ln.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_user_unit_keeps_what_a_user_manager_runs_and_nothing_it_refuses() -> None:
    d = _directives(USER_UNIT.read_text())
    # Refused by a user manager (216/GROUP, 218/CAPABILITIES), or silently ignored without PrivateUsers=.
    refused = {
        "User", "Group", "DynamicUser", "SupplementaryGroups", "CapabilityBoundingSet", "AmbientCapabilities",
        "PrivateUsers", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
        "ProtectProc", "ProcSubset", "RemoveIPC", "ReadWritePaths", "RequiresMountsFor", "KeyringMode",
    }  # fmt: skip
    assert not refused & d.keys(), refused & d.keys()
    kept = {
        "Type", "WatchdogSec", "Restart", "RestartPreventExitStatus", "NoNewPrivileges", "RestrictAddressFamilies",
        "SystemCallFilter", "SystemCallArchitectures", "UMask", "LimitNOFILE", "LoadCredential",
    }  # fmt: skip
    assert kept <= d.keys(), kept - d.keys()
    assert d["Type"] == ["notify"] and d["RestartPreventExitStatus"] == ["78"]
    assert d["WantedBy"] == ["default.target"]  # a user manager has no multi-user.target
    assert all(v.startswith("%h/") for k in ("ExecStart",) for v in d[k])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_user_unit_verifies_and_its_exposure_is_reported(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    s = subprocess.run(
        ["systemd-analyze", "--user", "security", "--offline=true", "--no-pager", str(USER_UNIT)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    exposure = _exposure(s.stdout)
    print(f"systemd-analyze --user security --offline=true systemd/noded-user.service: exposure {exposure}")
    # The analyzer scores a user unit as if it ran as root with every capability; this guards the
    # hardening the unit keeps (without it the score passes 8).
    assert exposure <= 6.5


def test_example_inventory_wires_peers_and_seed_targets(tmp_path: Path) -> None:
    """The example describes the real network: two slots in user scope, each with its own ports."""
    out = _render(tmp_path, EXAMPLE_INVENTORY, "smart_nodes")
    toronto = out / "toronto.smart.dataforcanada.org-config.toml"
    amsterdam = out / "amsterdam.smart.dataforcanada.org-config.toml"
    t = parse_config(toronto.read_text(), toronto)
    a = parse_config(amsterdam.read_text(), amsterdam)
    assert (t.node.name, a.node.name) == ("toronto", "amsterdam")
    assert [p.name for p in t.peers] == ["amsterdam"] and [p.name for p in a.peers] == ["toronto"]
    assert t.peers[0].bittorrent == "198.51.100.20:14872" and a.peers[0].api_url == "http://192.0.2.10:12470"
    assert (t.api.port, t.http_mirror.port, t.bittorrent.listen_interfaces) == (12470, 12471, "0.0.0.0:12472")
    assert [s.name for s in t.seed_targets] == ["netcup"] == [s.name for s in a.seed_targets]
    assert t.seed_targets[0].bittorrent == "203.0.113.30:51413"
    assert str(t.paths.cache_dir) == "/home/dfctoronto/.cache/noded"
    assert t.origins.inbox.dir == Path("/home/dfctoronto/.local/state/noded/inbox")
    assert t.cache.quota == 950_000_000_000
    unit = (out / "toronto.smart.dataforcanada.org-noded-user.service").read_text()
    assert "ExecStart=%h/.local/share/noded/venv/bin/noded -c %h/.config/noded/config.toml run\n" in unit
    assert "LoadCredential" not in unit  # no secrets in the example inventory: no credential lines


def _toml_filter() -> Any:
    spec = importlib.util.spec_from_file_location("noded_toml", ROLE / "filter_plugins" / "noded_toml.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.noded_toml


_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
)
_values = st.one_of(_scalars, st.lists(st.text(max_size=8), max_size=3))
_tables = st.dictionaries(_keys, _values, max_size=4)


@given(
    st.dictionaries(
        _keys,
        st.one_of(
            _tables,
            st.lists(_tables.filter(bool), min_size=1, max_size=3),
            st.dictionaries(_keys, _tables, max_size=2),
        ),
        max_size=4,
    )
)
def test_toml_filter_round_trips(data: dict[str, Any]) -> None:
    noded_toml = _toml_filter()
    assert tomllib.loads(noded_toml(data)) == data


def test_toml_filter_refuses_values_toml_cannot_hold() -> None:
    noded_toml = _toml_filter()
    with pytest.raises(ValueError, match=r"cache\.budget"):
        noded_toml({"cache": {"budget": None}})


@pytest.mark.skipif(not _tool("ansible-lint"), reason="ansible-lint is not installed (pip install ansible-lint)")
def test_ansible_lint_production_profile() -> None:
    r = subprocess.run(
        [str(_tool("ansible-lint")), "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
