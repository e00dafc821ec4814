"""One booted systemd shared by the deployment tests of both scopes.

Booting, and building the wheelhouse, cost more than any test here, so the session boots the cached
rootfs once: sshd inside listens on a free loopback port and takes root's key (system scope) and the
key of `seed`, an unprivileged user with linger and no sudo (user scope, as on a shared slot).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, http_json
from tests.e2e.booted import BootedSystem, missing_prerequisites

ANSIBLE_DIR = ROOT / "ansible"
SITE = ANSIBLE_DIR / "site.yml"
TARGET_PYTHON = (3, 11)  # bookworm's python3; the wheelhouse is built for it
SLOT_USER = "seed"


def ansible_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def skip_reason() -> str | None:
    why = missing_prerequisites()
    if why:
        return why
    if not ansible_tool("ansible-playbook"):
        return "ansible-playbook is not installed (pip install ansible-core)"
    if sys.version_info[:2] != TARGET_PYTHON:
        return f"the wheelhouse must be built by Python {TARGET_PYTHON} to match bookworm's"
    return None


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP lines: host -> {ok, changed, unreachable, failed, skipped, ...}."""
    out: dict[str, dict[str, int]] = {}
    lines = output.splitlines()
    if "PLAY RECAP" not in output:
        raise AssertionError(f"no PLAY RECAP in the playbook output:\n{output[-3000:]}")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("PLAY RECAP"))
    for line in lines[start + 1 :]:
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


@dataclass
class DeployTarget:
    """The booted system as a deployment target: SSH on 127.0.0.1, as root or as the slot user."""

    system: BootedSystem
    workdir: Path
    ssh_port: int
    root_key: Path
    user_key: Path
    user: str
    uid: int

    def ssh_vars(self, as_user: bool) -> dict[str, Any]:
        return {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.ssh_port,
            "ansible_user": self.user if as_user else "root",
            "ansible_become": False,
            "ansible_ssh_private_key_file": str(self.user_key if as_user else self.root_key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        }

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command run by the slot user over SSH: a login, as an operator would type it."""
        argv = [
            "ssh", "-q", "-i", str(self.user_key), "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            f"{self.user}@127.0.0.1", command,
        ]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, input=input or "")
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {command!r} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r


def run_playbook(
    workdir: Path, inventory: Path, wheelhouse: Path, *extra: str, tag: str
) -> subprocess.CompletedProcess[str]:
    """site.yml against the inventory; the full output is kept in workdir for a failed test's reader."""
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
    }
    argv = [
        str(ansible_tool("ansible-playbook")),
        "-i",
        str(inventory),
        str(SITE),
        "-e",
        f"noded_wheelhouse_dir={wheelhouse}",
        *extra,
    ]
    r = subprocess.run(argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600)
    (workdir / f"playbook-{tag}.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    return r


def wait_ready(api: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = http_json(api + "/readyz", timeout=2)
            if status == 200:
                return
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"/readyz not 200 after {timeout}s: {last}")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = skip_reason()
    if why:
        pytest.skip(why)
    dest = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [str(ANSIBLE_DIR / "scripts/build-wheelhouse"), str(ROOT), str(dest), sys.executable],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return dest


def _keypair(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def test_host(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[DeployTarget]:
    work = tmp_path_factory.mktemp("e2e-host")
    root_key = _keypair(work / "id_root")
    user_key = _keypair(work / "id_user")
    ssh_port = free_port()
    system = BootedSystem(work / "boot", hostname="toronto")
    system.put(
        "/etc/ssh/sshd_config.d/noded-test.conf",
        f"Port {ssh_port}\nListenAddress 127.0.0.1\nPasswordAuthentication no\nUseDNS no\n",
    )
    (system.upper / "root").mkdir(parents=True, exist_ok=True)
    (system.upper / "root").chmod(0o700)
    system.put("/root/.ssh/authorized_keys", root_key.with_suffix(".pub").read_text(), mode=0o600)
    (system.upper / "root/.ssh").chmod(0o700)
    with system:
        # The slot user: a plain account, no sudo (minbase has none), linger as the provider sets it.
        system.run(["useradd", "--create-home", "--shell", "/bin/bash", SLOT_USER])
        home = f"/home/{SLOT_USER}"
        system.run(["install", "-d", "-m", "700", "-o", SLOT_USER, "-g", SLOT_USER, f"{home}/.ssh"])
        system.run(
            ["install", "-m", "600", "-o", SLOT_USER, "-g", SLOT_USER, "/dev/stdin", f"{home}/.ssh/authorized_keys"],
            input=user_key.with_suffix(".pub").read_text(),
        )
        system.run(["loginctl", "enable-linger", SLOT_USER])
        uid = int(system.run(["id", "-u", SLOT_USER]).stdout)
        host = DeployTarget(system, work, ssh_port, root_key, user_key, SLOT_USER, uid)
        deadline = time.monotonic() + 60
        while host.ssh("systemctl --user is-system-running", check=False).stdout.strip() not in (
            "running",
            "degraded",
        ):
            assert time.monotonic() < deadline, "the slot user's manager did not come up"
            time.sleep(0.5)
        hold = float(os.environ.get("NODED_E2E_HOLD", "0"))
        yield host
        if hold > 0:  # NODED_E2E_HOLD=SECONDS keeps the system up after the tests for a look
            print(f"holding {hold}s: nsenter -t {system.pid} -m -u -p -r -w bash", flush=True)
            time.sleep(hold)
