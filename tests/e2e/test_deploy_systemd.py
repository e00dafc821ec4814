"""End to end, system scope: ansible-playbook over SSH as root deploys noded into a booted systemd.

One Debian bookworm rootfs (debootstrap, cached outside the clone) is booted with systemd as PID 1
(tests/e2e/conftest.py); sshd inside listens on a free loopback port and site.yml runs against it
with the role, installing from a wheelhouse built with ansible/scripts/build-wheelhouse. The tests
then look at the result the way an operator would: systemctl, journalctl, /readyz, systemd-analyze.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.booted import BootedSystem
from tests.e2e.conftest import DeployTarget, recap, run_playbook, wait_ready

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Deployment:
    system: BootedSystem
    inventory: Path
    wheelhouse: Path
    workdir: Path
    api: str
    token: str
    runs: int = 0
    first_stats: dict[str, Any] = field(default_factory=dict)
    last_output: str = ""

    def playbook(self, *extra: str, expect_ok: bool = True) -> dict[str, Any]:
        """Run site.yml; the recap's per-host stats."""
        self.runs += 1
        r = run_playbook(self.workdir, self.inventory, self.wheelhouse, *extra, tag=f"system-{self.runs}")
        self.last_output = r.stdout + "\n--- stderr ---\n" + r.stderr
        if expect_ok and r.returncode != 0:
            status = self.system.run(["systemctl", "status", "noded", "--no-pager", "-l"], check=False).stdout
            raise AssertionError(
                f"ansible-playbook failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}\n"
                f"--- systemctl status noded ---\n{status}\n--- journal ---\n{self.journal()[-3000:]}"
            )
        print(f"playbook run {self.runs} {' '.join(extra)}: {recap(r.stdout)}")
        return recap(r.stdout)

    def wait_ready(self, timeout: float = 90) -> None:
        try:
            wait_ready(self.api, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.journal()[-3000:]}") from None

    def journal(self) -> str:
        return self.system.run(["journalctl", "-u", "noded", "-o", "cat", "--no-pager"]).stdout


@pytest.fixture(scope="module")
def deployment(test_host: DeployTarget, wheelhouse: Path) -> Iterator[Deployment]:
    work = test_host.workdir / "system-scope"
    work.mkdir()
    api_port, mirror_port, bt_port = (free_port() for _ in range(3))
    token = secrets.token_urlsafe(24)
    host = {
        **test_host.ssh_vars(as_user=False),
        "noded_node_name": "toronto",
        "noded_region": "test",
        "noded_cache_budget": "1GB",
        "noded_cache_free_space_floor": "1MB",
        "noded_api_port": api_port,
        "noded_http_mirror_port": mirror_port,
        "noded_bittorrent_bind": "127.0.0.1",
        "noded_bittorrent_port": bt_port,
        "noded_probe": {"enabled": False},
        "noded_api_token": token,
    }
    inventory = {
        "all": {
            "children": {
                "smart_nodes": {"hosts": {"toronto": host}},
                "seed_targets": {
                    "hosts": {"netcup": {"ansible_host": "127.0.0.1", "noded_seed_bittorrent_port": free_port()}}
                },
            }
        }
    }
    inv = work / "inventory.yml"
    inv.write_text(json.dumps(inventory, indent=2))  # JSON is YAML
    dep = Deployment(test_host.system, inv, wheelhouse, work, f"http://127.0.0.1:{api_port}", token)
    dep.first_stats = dep.playbook()
    yield dep
    # The booted system goes on to the user-scope tests: leave it without this node.
    test_host.system.run(["systemctl", "disable", "--now", "noded"], check=False)


def test_first_run_deploys_a_ready_service_under_systemd(deployment: Deployment) -> None:
    """is-active, STATUS= in systemctl status, /readyz 200, JSON lines in the journal."""
    stats = deployment.first_stats
    assert stats["toronto"]["failed"] == 0 and stats["toronto"]["changed"] > 0
    sysd = deployment.system
    assert sysd.run(["systemctl", "is-active", "noded"]).stdout.strip() == "active"
    assert sysd.run(["systemctl", "is-enabled", "noded"]).stdout.strip() == "enabled"
    status = sysd.run(["systemctl", "status", "noded", "--no-pager", "-l"], check=False).stdout
    print(status)
    status_lines = [ln.strip() for ln in status.splitlines() if ln.strip().startswith("Status:")]
    assert status_lines, status
    assert "cached" in status_lines[0] and "peers up" in status_lines[0], status_lines
    deployment.wait_ready()
    events = []
    for line in deployment.journal().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    names = [e.get("event") for e in events]
    assert "daemon.ready" in names, names
    # The rendered config wires the seed target from the inventory's seed_targets group.
    cfg = sysd.run(["cat", "/etc/noded/config.toml"]).stdout
    assert "[[seed_targets]]" in cfg and 'name = "netcup"' in cfg
    # The secret is handed over as a systemd credential: never in the environment or the journal.
    unit = sysd.run(["systemctl", "cat", "noded"]).stdout
    assert "LoadCredential=api-token:/etc/noded/credentials/api-token" in unit
    assert "r2-access-key-id" not in unit.split("[Service]")[1].split("# Hardening")[0]  # unset: no line
    main_pid = sysd.systemctl_show("noded", "MainPID")["MainPID"]
    environ = sysd.run(["cat", f"/proc/{main_pid}/environ"]).stdout.split("\0")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/noded.service" in environ
    assert not any(deployment.token in e for e in environ)
    assert deployment.token not in deployment.journal()
    # The service's copy, read through its own mount namespace (where systemd mounted it).
    cred = sysd.run(["nsenter", "-t", main_pid, "-m", "-r", "cat", "/run/credentials/noded.service/api-token"])
    assert cred.stdout == deployment.token
    mode = sysd.run(["stat", "-c", "%a %U", "/etc/noded/credentials/api-token"]).stdout.split()
    assert mode == ["600", "root"]
    owner = sysd.run(["stat", "-c", "%U", f"/proc/{main_pid}"]).stdout.strip()
    assert owner == "noded"


def test_second_run_changes_nothing_and_check_diff_works(deployment: Deployment) -> None:
    """Idempotent; a --check --diff run also reports nothing to change."""
    pid = deployment.system.systemctl_show("noded", "MainPID")["MainPID"]
    stats = deployment.playbook()
    assert stats["toronto"]["changed"] == 0, stats
    wheels = deployment.system.run(["ls", "/opt/noded/wheelhouse"]).stdout.split()
    assert sorted(wheels) == sorted(p.name for p in deployment.wheelhouse.glob("*.whl"))
    stats = deployment.playbook("--check", "--diff")
    assert stats["toronto"]["changed"] == 0 and stats["toronto"]["failed"] == 0, stats
    stats = deployment.playbook("--tags", "configure,service")
    assert stats["toronto"]["changed"] == 0 and stats["toronto"]["failed"] == 0, stats
    assert deployment.system.systemctl_show("noded", "MainPID")["MainPID"] == pid  # not restarted


def test_unit_verifies_and_security_exposure_at_most_2(deployment: Deployment) -> None:
    """The installed unit inside the booted system."""
    sysd = deployment.system
    v = sysd.run(["systemd-analyze", "verify", "/etc/systemd/system/noded.service"], check=False)
    assert v.returncode == 0, v.stderr
    r = sysd.run(["systemd-analyze", "security", "--no-pager", "noded.service"], check=False)
    overall = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
    assert overall, r.stdout + r.stderr
    exposure = float(overall[0].split(":")[1].split()[0])
    print(f"systemd-analyze security noded.service (booted): exposure {exposure}")
    assert exposure <= 2.0


def test_bad_variable_is_refused_before_it_reaches_the_node(deployment: Deployment) -> None:
    """check-config validates the rendered file: the run fails naming the key; nothing is lost."""
    sysd = deployment.system
    before = sysd.run(["cat", "/etc/noded/config.toml"]).stdout
    pid = sysd.systemctl_show("noded", "MainPID")["MainPID"]
    out = deployment.playbook("-e", "noded_cache_budget=plenty", expect_ok=False)
    assert out["toronto"]["failed"] == 1, out
    assert "cache.budget" in deployment.last_output
    assert sysd.run(["cat", "/etc/noded/config.toml"]).stdout == before
    assert sysd.systemctl_show("noded", "MainPID")["MainPID"] == pid
    deployment.wait_ready()


def test_killed_daemon_is_restarted_and_ready_again(deployment: Deployment) -> None:
    """SIGKILL -> Restart=on-failure brings it back."""
    sysd = deployment.system
    before = sysd.systemctl_show("noded", "MainPID", "NRestarts")
    sysd.run(["systemctl", "kill", "-s", "KILL", "noded"])
    deadline = time.monotonic() + 90
    now = before
    while time.monotonic() < deadline:
        now = sysd.systemctl_show("noded", "MainPID", "NRestarts", "ActiveState")
        if now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"]):
            break
        time.sleep(0.5)
    assert now["ActiveState"] == "active" and now["MainPID"] != before["MainPID"], now
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    deployment.wait_ready()


def test_broken_config_fails_with_78_without_restart_loop(deployment: Deployment) -> None:
    """Exit 78, no restart, the journal names the key; the playbook then repairs it."""
    sysd = deployment.system
    cfg = sysd.run(["cat", "/etc/noded/config.toml"]).stdout
    assert 'budget = "1GB"' in cfg
    sysd.run(["tee", "/etc/noded/config.toml"], input=cfg.replace('budget = "1GB"', 'budget = "plenty"'))
    r = sysd.run(["systemctl", "restart", "noded"], check=False, timeout=120)
    assert r.returncode != 0
    time.sleep(12)  # longer than twice RestartSec: a restart loop would have shown by now
    show = sysd.systemctl_show("noded", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert show["ActiveState"] == "failed" and show["Result"] == "exit-code", show
    assert show["ExecMainStatus"] == "78", show
    # A manual restart resets NRestarts to 0: anything above 0 is an automatic restart.
    assert show["NRestarts"] == "0", show
    journal = deployment.journal()
    assert "cache.budget" in journal and "configuration error" in journal, journal[-2000:]
    # Operators fix it by deploying again: the template replaces the file and restarts the unit,
    # and wheels the controller no longer has are dropped from the target's wheelhouse.
    sysd.run(["cp", "/etc/hostname", "/opt/noded/wheelhouse/stale-0.1-py3-none-any.whl"])
    stats = deployment.playbook()
    assert "stale-0.1-py3-none-any.whl" not in sysd.run(["ls", "/opt/noded/wheelhouse"]).stdout
    assert stats["toronto"]["changed"] > 0
    assert sysd.run(["systemctl", "is-active", "noded"]).stdout.strip() == "active"
    deployment.wait_ready()
