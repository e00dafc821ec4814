"""A real systemd booted as PID 1 of a throw-away overlay of a cached Debian bookworm rootfs.

systemd-nspawn does not work on these machines (no host bus), so the boot is done by hand:
`unshare --pid --fork --mount --uts` runs boot-rootfs.sh, which mounts an overlay (the cached rootfs
stays pristine), /proc, /sys, /dev and tmpfs /run and /tmp inside the new mount namespace and execs
systemd. Every mount lives in that namespace, so SIGKILL to its PID 1 (from outside, where the
signal is not ignored) ends every process and mount of the boot. What the booted systemd leaves
behind outside, empty cgroup directories, is removed by `stop()`.

The boot shares the host's network namespace, so every port inside is chosen free on the host's
loopback. (Two boots at once would also share the host's cgroup tree; that needs a cgroup namespace
first, which is not done here.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOT_SCRIPT = HERE / "boot-rootfs.sh"
DEBIAN_MIRROR = os.environ.get("NODED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3-venv: the role's virtualenv; openssh-server: Ansible's way in; iproute2: network namespaces;
# libpam-systemd and dbus-user-session: a user manager (systemd --user) for a login or a lingering user.
ROOTFS_PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-venv,openssh-server,iproute2,libpam-systemd,dbus-user-session"
)
# One cached rootfs per package list: checkouts with different lists share the machine's cache
# without rebuilding (and deleting) each other's rootfs under a running boot.
ROOTFS_CACHE = Path(
    os.environ.get(
        "NODED_ROOTFS_CACHE",
        f"/var/cache/noded-test/rootfs-bookworm-{hashlib.sha256(ROOTFS_PACKAGES.encode()).hexdigest()[:10]}",
    )
)
STAMP = ".noded-rootfs"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def missing_prerequisites() -> str | None:
    """Why the booted-systemd tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, unshare, mounts)"
    for tool in ("unshare", "nsenter", "chroot", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not (ROOTFS_CACHE / STAMP).is_file() and not shutil.which("debootstrap"):
        return f"debootstrap is not installed and there is no cached rootfs at {ROOTFS_CACHE}"
    return None


def ensure_rootfs() -> Path:
    """The cached bookworm rootfs, built once with debootstrap (a few minutes) and reused after."""
    stamp = ROOTFS_CACHE / STAMP
    if stamp.is_file() and stamp.read_text().strip() == ROOTFS_PACKAGES:
        return ROOTFS_CACHE
    partial = ROOTFS_CACHE.with_name(f"{ROOTFS_CACHE.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={ROOTFS_PACKAGES}",
            "bookworm",
            str(partial),
            DEBIAN_MIRROR,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=1800,
    )
    finish_rootfs(partial)
    if (ROOTFS_CACHE / STAMP).is_file():  # another run finished the same rootfs meanwhile
        shutil.rmtree(partial)
        return ROOTFS_CACHE
    if ROOTFS_CACHE.exists():
        shutil.rmtree(ROOTFS_CACHE)
    partial.rename(ROOTFS_CACHE)
    return ROOTFS_CACHE


def finish_rootfs(root: Path) -> None:
    """No login prompts on the host's consoles; then mark the rootfs complete."""
    for unit in ("getty.target", "console-getty.service", "serial-getty@.service", "getty@.service"):
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / STAMP).write_text(ROOTFS_PACKAGES + "\n")


def _cgroup_dirs() -> set[Path]:
    out: set[Path] = set()
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir():
            for dirpath, _dirs, _files in os.walk(hierarchy):
                out.add(Path(dirpath))
    return out


class BootedSystem:
    """One booted rootfs. Use as a context manager: it is always torn down, also on failure."""

    def __init__(self, workdir: Path, hostname: str) -> None:
        self.workdir = workdir
        self.hostname = hostname
        self.upper = workdir / "upper"
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # the booted systemd, as seen from the host
        self._cgroups_before: set[Path] = set()
        self._pidns: str | None = None

    # -- files placed into the overlay before the boot -----------------------------------------
    def put(self, path: str, content: str, mode: int = 0o644) -> None:
        dest = self.upper / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
        dest.chmod(mode)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> BootedSystem:
        lower = ensure_rootfs()
        for d in (self.upper, self.workdir / "work", self.root):
            d.mkdir(parents=True, exist_ok=True)
        self.put("/etc/hostname", self.hostname + "\n")
        self._cgroups_before = _cgroup_dirs()
        argv = [
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            str(BOOT_SCRIPT),
            str(lower),
            str(self.upper),
            str(self.workdir / "work"),
            str(self.root),
            self.hostname,
        ]
        with open(self.console, "wb") as con:
            self._unshare = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=con, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self._find_systemd(timeout=30)
        self._pidns = os.readlink(f"/proc/{self.pid}/ns/pid")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["systemctl", "is-system-running"], check=False)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.5)
        raise TimeoutError(f"booted system {self.hostname} is {state!r} after {timeout}s:\n{self.console_text()}")

    def _find_systemd(self, timeout: float) -> int:
        assert self._unshare is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise RuntimeError(f"boot of {self.hostname} failed:\n{self.console_text()}")
            # unshare --fork's child becomes the namespace's PID 1 and execs systemd.
            for pid in _descendants(self._unshare.pid):
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(ln.split()[-1] for ln in status.splitlines() if ln.startswith("NSpid:"))
                    if nspid == "1" and os.readlink(f"/proc/{pid}/exe").endswith("/systemd"):
                        return pid
            time.sleep(0.1)
        raise TimeoutError(f"no systemd appeared for {self.hostname}:\n{self.console_text()}")

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # ends every process of the PID namespace
        if self._unshare is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._unshare.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._unshare.wait(timeout=30)
        self._wait_gone()
        self._remove_cgroups()
        self.pid = None

    def _wait_gone(self, timeout: float = 30) -> None:
        """Until no process of this boot's PID namespace remains."""
        if self._pidns is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        if os.readlink(entry / "ns" / "pid") == self._pidns:
                            left.append(int(entry.name))
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def _remove_cgroups(self) -> None:
        """The booted systemd made cgroups in the host's hierarchies; remove the ones it created."""
        if not self._cgroups_before:
            return
        for _ in range(50):
            new = sorted(_cgroup_dirs() - self._cgroups_before, key=lambda p: len(p.parts), reverse=True)
            if not new:
                return
            for d in new:
                with contextlib.suppress(OSError):
                    d.rmdir()
            time.sleep(0.1)

    def __enter__(self) -> BootedSystem:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside ---------------------------------------------------------------------------------
    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the booted system (its mount, UTS and PID namespaces and root)."""
        assert self.pid is not None
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-r", "-w"]
        r = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def systemctl_show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                for child in (task / "children").read_text().split():
                    out.append(int(child))
                    todo.append(int(child))
    return out
