"""End to end, user scope: a shared seedbox slot. The playbook connects over SSH as an unprivileged
user with linger and no sudo, and deploys noded into that user's home and systemd --user manager.

The booted system is the one of tests/e2e/conftest.py. The tests look at the result as the slot's
user would, over SSH: systemctl --user, journalctl --user, /readyz, systemd-analyze --user.
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

from tests.conftest import ROOT, free_port, http_json
from tests.e2e.conftest import DeployTarget, recap, run_playbook, wait_ready

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]

PROBE = ROOT / "ansible" / "scripts" / "probe-slot"


@dataclass
class UserDeployment:
    host: DeployTarget
    inventory: Path
    wheelhouse: Path
    workdir: Path
    api: str
    token: str
    runs: int = 0
    first_stats: dict[str, Any] = field(default_factory=dict)
    last_output: str = ""

    @property
    def home(self) -> str:
        return f"/home/{self.host.user}"

    def playbook(self, *extra: str, expect_ok: bool = True) -> dict[str, Any]:
        self.runs += 1
        r = run_playbook(self.workdir, self.inventory, self.wheelhouse, *extra, tag=f"user-{self.runs}")
        self.last_output = r.stdout + "\n--- stderr ---\n" + r.stderr
        if expect_ok and r.returncode != 0:
            status = self.host.ssh("systemctl --user status noded --no-pager -l", check=False).stdout
            raise AssertionError(
                f"ansible-playbook failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}\n"
                f"--- systemctl --user status noded ---\n{status}\n--- journal ---\n{self.journal()[-3000:]}"
            )
        print(f"playbook run {self.runs} {' '.join(extra)}: {recap(r.stdout)}")
        return recap(r.stdout)

    def show(self, *props: str) -> dict[str, str]:
        out = self.host.ssh(f"systemctl --user show noded -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.host.ssh("journalctl --user -u noded -o cat --no-pager", check=False).stdout

    def wait_ready(self, timeout: float = 90) -> None:
        try:
            wait_ready(self.api, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.journal()[-3000:]}") from None

    def wait_restarted(self, old_pid: str, timeout: float = 90) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        now: dict[str, str] = {}
        while time.monotonic() < deadline:
            now = self.show("MainPID", "NRestarts", "ActiveState")
            if now["ActiveState"] == "active" and now["MainPID"] not in ("0", old_pid):
                return now
            time.sleep(0.5)
        raise AssertionError(f"noded did not come back: {now}")


@pytest.fixture(scope="module")
def slot(test_host: DeployTarget, wheelhouse: Path) -> Iterator[UserDeployment]:
    work = test_host.workdir / "user-scope"
    work.mkdir()
    # The slot's port allocation, as the operator copies it into the inventory.
    api_port, mirror_port, bt_port = (free_port() for _ in range(3))
    token = secrets.token_urlsafe(24)
    host = {
        **test_host.ssh_vars(as_user=True),
        "noded_scope": "user",
        "noded_python": "/usr/bin/python3.11",
        "noded_node_name": "slot",
        "noded_region": "test",
        "noded_cache_budget": "1GB",
        "noded_cache_quota": "2GB",  # the home's quota, as the operator copies it from the plan
        "noded_cache_free_space_floor": "1MB",
        "noded_api_port": api_port,
        "noded_http_mirror_port": mirror_port,
        "noded_bittorrent_bind": "127.0.0.1",
        "noded_bittorrent_port": bt_port,
        "noded_probe": {"enabled": False},
        "noded_api_token": token,
    }
    inventory = {"all": {"children": {"smart_nodes": {"hosts": {"slot": host}}}}}
    inv = work / "inventory.yml"
    inv.write_text(json.dumps(inventory, indent=2))
    dep = UserDeployment(test_host, inv, wheelhouse, work, f"http://127.0.0.1:{api_port}", token)
    dep.first_stats = dep.playbook()
    yield dep


def test_first_run_deploys_a_ready_user_service(slot: UserDeployment) -> None:
    """Runs as the user under their manager; Status line, /readyz, journal, credential, files at home."""
    stats = slot.first_stats
    assert stats["slot"]["failed"] == 0 and stats["slot"]["changed"] > 0
    ssh = slot.host.ssh
    assert ssh("systemctl --user is-active noded").stdout.strip() == "active"
    assert ssh("systemctl --user is-enabled noded").stdout.strip() == "enabled"
    status = ssh("systemctl --user status noded --no-pager -l", check=False).stdout
    print(status)
    status_lines = [ln.strip() for ln in status.splitlines() if ln.strip().startswith("Status:")]
    assert status_lines, status
    assert "cached" in status_lines[0] and "peers up" in status_lines[0], status_lines
    slot.wait_ready()
    names = []
    for line in slot.journal().splitlines():
        try:
            names.append(json.loads(line).get("event"))
        except ValueError:
            continue
    assert "daemon.ready" in names, names

    home = slot.home
    unit_path = f"{home}/.config/systemd/user/noded.service"
    unit = ssh(f"cat {unit_path}").stdout
    assert "WantedBy=default.target" in unit
    for refused in ("User=", "Group=", "CapabilityBoundingSet=", "PrivateUsers=", "ProtectSystem="):
        assert f"\n{refused}" not in unit, refused
    # Everything under the home, owned by the user; nothing the user cannot manage.
    owners = ssh(
        f"find {home}/.local/share/noded {home}/.config/noded {home}/.local/state/noded {home}/.cache/noded"
        f" {unit_path} ! -user {slot.host.user} -print"
    ).stdout
    assert owners == ""
    mode = ssh(f"stat -c %a {home}/.config/noded/credentials/api-token").stdout.strip()
    assert mode == "600"
    # The process is the user's, and its secret came as a credential, never in the environment.
    pid = slot.show("MainPID")["MainPID"]
    assert slot.host.system.run(["stat", "-c", "%U", f"/proc/{pid}"]).stdout.strip() == slot.host.user
    environ = ssh(f"cat /proc/{pid}/environ").stdout.split("\0")
    cred_dirs = [e.split("=", 1)[1] for e in environ if e.startswith("CREDENTIALS_DIRECTORY=")]
    assert cred_dirs and cred_dirs[0].startswith(f"/run/user/{slot.host.uid}/"), environ
    assert not any(slot.token in e for e in environ)
    assert slot.token not in slot.journal()
    status_code, _ = http_json(
        slot.api + "/v1/items/no-such-item/pin", method="POST", headers={"Authorization": f"Bearer {slot.token}"}
    )
    assert status_code == 404  # authorised (a wrong token is 401), and the item is unknown
    # Free space answers to the quota, not to the filesystem statvfs shows.
    _, st = http_json(slot.api + "/v1/status")
    quota = st["components"]["cache"]["quota"]
    assert quota["source"] == "cache.quota" and quota["limit_bytes"] == 2_000_000_000, quota
    assert st["components"]["cache"]["fs_free_bytes"] <= quota["headroom_bytes"]


def test_check_config_on_the_slot_reports_against_the_quota(slot: UserDeployment) -> None:
    """The operator's check of a bigger budget, run as the slot user: refused, naming the quota."""
    home = slot.home
    r = slot.host.ssh(
        f'sed \'s/budget = "1GB"/budget = "3GB"/\' {home}/.config/noded/config.toml > /tmp/bigger.toml'
        f" && {home}/.local/share/noded/venv/bin/noded -c /tmp/bigger.toml check-config --skip-ports",
        check=False,
    )
    assert r.returncode == 78, r.stdout + r.stderr
    assert "cache.budget" in r.stderr and "larger than cache.quota (2000000000 bytes)" in r.stderr, r.stderr


def test_second_run_changes_nothing(slot: UserDeployment) -> None:
    pid = slot.show("MainPID")["MainPID"]
    stats = slot.playbook()
    assert stats["slot"]["changed"] == 0, stats
    stats = slot.playbook("--check", "--diff")
    assert stats["slot"]["changed"] == 0 and stats["slot"]["failed"] == 0, stats
    assert slot.show("MainPID")["MainPID"] == pid  # not restarted


def test_user_unit_verifies_and_its_exposure_is_reported(slot: UserDeployment) -> None:
    """systemd-analyze --user on the installed unit: nothing a user manager rejects; the score."""
    unit = f"{slot.home}/.config/systemd/user/noded.service"
    v = slot.host.ssh(f"systemd-analyze --user verify {unit}", check=False)
    assert v.returncode == 0, v.stderr
    assert v.stderr.strip() == "", v.stderr  # no warning, such as an ignored or unknown directive
    r = slot.host.ssh("systemd-analyze --user security --no-pager noded.service", check=False)
    overall = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
    assert overall, r.stdout + r.stderr
    print(f"systemd-analyze --user security noded.service (booted): {overall[0].split(':', 1)[1].strip()}")
    # The user manager started it with every directive: no "Unknown key", "ignoring" or failure.
    manager_log = slot.host.ssh("journalctl --user -u noded --no-pager -o cat _PID=1", check=False).stdout
    manager_log += slot.host.system.run(
        ["journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_UNIT=user@{slot.host.uid}.service"], check=False
    ).stdout
    noded_lines = [ln for ln in manager_log.splitlines() if "noded.service" in ln]
    bad = [ln for ln in noded_lines if any(w in ln.lower() for w in ("unknown", "ignoring", "failed to"))]
    assert not bad, bad


def test_killed_daemon_is_restarted_by_the_user_manager(slot: UserDeployment) -> None:
    before = slot.show("MainPID", "NRestarts")
    slot.host.ssh("systemctl --user kill -s KILL noded")
    now = slot.wait_restarted(before["MainPID"])
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    slot.wait_ready()


def test_broken_config_exits_78_without_restart(slot: UserDeployment) -> None:
    ssh = slot.host.ssh
    cfg_path = f"{slot.home}/.config/noded/config.toml"
    cfg = ssh(f"cat {cfg_path}").stdout
    assert 'budget = "1GB"' in cfg
    ssh(f'sed -i \'s/budget = "1GB"/budget = "plenty"/\' {cfg_path}')
    assert ssh("systemctl --user restart noded", check=False, timeout=120).returncode != 0
    time.sleep(12)  # longer than twice RestartSec: a restart loop would have shown by now
    show = slot.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert show["ActiveState"] == "failed" and show["Result"] == "exit-code", show
    assert show["ExecMainStatus"] == "78", show
    assert show["NRestarts"] == "0", show  # a manual restart resets it: above 0 is an automatic one
    assert "cache.budget" in slot.journal()
    stats = slot.playbook()  # the operator's repair: deploy again
    assert stats["slot"]["changed"] > 0
    assert ssh("systemctl --user is-active noded").stdout.strip() == "active"
    slot.wait_ready()


def test_restarted_user_manager_brings_noded_back(slot: UserDeployment) -> None:
    """What a boot does for a lingering user: a new user manager starts default.target, and noded."""
    pid = slot.show("MainPID")["MainPID"]
    slot.host.system.run(["systemctl", "restart", f"user@{slot.host.uid}.service"], timeout=120)
    slot.wait_restarted(pid)
    slot.wait_ready()


def test_fallbacks_file_log_and_credential_files(slot: UserDeployment) -> None:
    """Where a slot has no user journal or no LoadCredential=: a log file, and 0600 files read in place."""
    ssh = slot.host.ssh
    stats = slot.playbook("-e", "noded_user_log=file", "-e", "noded_user_credentials=files")
    assert stats["slot"]["changed"] > 0
    slot.wait_ready()
    unit = ssh(f"cat {slot.home}/.config/systemd/user/noded.service").stdout
    assert "LoadCredential=" not in unit and "Environment=CREDENTIALS_DIRECTORY=%h/.config/noded/credentials" in unit
    log = ssh(f"cat {slot.home}/.local/state/noded/noded.log").stdout
    assert "daemon.ready" in log and slot.token not in log
    status_code, _ = http_json(
        slot.api + "/v1/items/no-such-item/pin", method="POST", headers={"Authorization": f"Bearer {slot.token}"}
    )
    assert status_code == 404  # the token was read from the file
    stats = slot.playbook()  # back to what the slot offers (journal, LoadCredential=)
    assert stats["slot"]["changed"] > 0
    assert "LoadCredential=api-token:" in ssh(f"cat {slot.home}/.config/systemd/user/noded.service").stdout
    slot.wait_ready()


def test_preflight_names_what_is_missing(slot: UserDeployment) -> None:
    """A Python older than noded needs, and linger off: each refused with what to do about it."""
    out = slot.playbook("-e", "noded_python=/usr/bin/python3-missing", expect_ok=False)
    assert out["slot"]["failed"] == 1, out
    assert "noded_python (/usr/bin/python3-missing) must be a Python 3.11" in slot.last_output
    slot.host.system.run(["loginctl", "disable-linger", slot.host.user])
    try:
        out = slot.playbook("--tags", "configure", expect_ok=False)
        assert out["slot"]["failed"] == 1, out
        assert f"loginctl enable-linger {slot.host.user}" in slot.last_output, slot.last_output[-3000:]
    finally:
        slot.host.system.run(["loginctl", "enable-linger", slot.host.user])
    pid = slot.show("MainPID")["MainPID"]
    if pid == "0":  # the manager stopped when the last session ended without linger
        slot.wait_restarted(pid)
    slot.wait_ready()


def test_probe_reports_what_the_slot_offers(slot: UserDeployment) -> None:
    """The operator's first look at a slot, run over SSH as its user; each line checked against the harness."""
    out = slot.host.ssh("sh -s", input=PROBE.read_text()).stdout
    print(out)
    facts = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    assert facts["os"].startswith("Debian GNU/Linux 12")
    assert facts["systemd"].startswith("252")
    assert facts["user manager"] in ("running", "degraded")
    assert facts["linger"] == "yes"
    assert facts["user journal"] == "yes"
    assert facts["python3.11"].startswith("/usr/bin/python3.11 3.11.")
    assert facts["LoadCredential in a user unit"] == "yes"
    assert facts["PrivateUsers in a user unit"] in ("yes", "no")
    assert facts["free ports"].startswith("no app-ports command")
    slot.host.system.run(["loginctl", "disable-linger", slot.host.user])
    try:
        assert slot.host.ssh("sh -s", input=PROBE.read_text()).stdout.count("linger: no") == 1
    finally:
        slot.host.system.run(["loginctl", "enable-linger", slot.host.user])
