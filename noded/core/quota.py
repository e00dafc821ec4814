"""Disk quota: how much more the node may write where statvfs cannot tell.

On a shared host the home directory lies on a large filesystem under a per-user quota: statvfs
reports the whole filesystem's free space, and writing past the quota stops the user's services.
Free space is therefore the smaller of the filesystem's free space and the quota's headroom. The
headroom comes from the system (`quota`, the user's quota on the cache's filesystem) where it reports
one, and from `cache.quota`, the configured limit on what the node keeps there, where that is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
# `quota` is a subprocess: read it at most this often, and correct for the node's own writes between.
SYSTEM_QUOTA_TTL = 60.0


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int  # bytes the user (system) or the node (config) may keep on the filesystem
    used: int  # bytes counted against the limit
    source: str  # "system (quota on MOUNT)" or "cache.quota"

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.used)


def parse_quota(text: str, mountpoint: Path | None = None) -> Quota | None:
    """The block quota in `quota -w -p --show-mntpoint --hide-device` output, or None when it shows none.

    Data lines are `FILESYSTEM BLOCKS[*] SOFT HARD GRACE FILES SOFT HARD GRACE` in 1 KiB blocks (`*`
    marks a filesystem over its soft limit). The smaller non-zero limit counts: past the soft one the
    provider may already stop the user's services. A line for `mountpoint` is preferred.
    """
    found: list[tuple[str, Quota]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[1].rstrip("*").isdigit():
            continue
        try:
            used, soft, hard = int(fields[1].rstrip("*")), int(fields[2]), int(fields[3])
        except ValueError:
            continue
        limits = [x for x in (soft, hard) if x > 0]
        if not limits:
            continue
        found.append((fields[0], Quota(min(limits) * KIB, used * KIB, f"system (quota on {fields[0]})")))
    if not found:
        return None
    if mountpoint is not None:
        for name, q in found:
            if name == str(mountpoint):
                return q
    return found[0][1]


def mount_point(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def read_system_quota(path: Path, timeout: float = 5.0) -> Quota | None:
    """The user's block quota on the filesystem of `path`, as the `quota` tool reports it; None when the
    tool is missing, fails, or shows no limit (most machines)."""
    exe = shutil.which("quota")
    if exe is None:
        return None
    mnt = mount_point(path)
    try:
        r = subprocess.run(
            [exe, "-w", "-p", "--show-mntpoint", "--hide-device", "-f", str(mnt)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # quota exits non-zero when a filesystem is over its limit: the output is what counts.
    return parse_quota(r.stdout, mnt)


class QuotaView:
    """Headroom under the system's and the configured quota for one cache directory. Thread-safe: the
    cache measures off the loop."""

    def __init__(self, path: Path, configured: int | None, *, read_system: bool = True) -> None:
        self.path = path
        self.configured = configured
        self.read_system = read_system
        self._lock = threading.Lock()
        self._system: Quota | None = None
        self._read_at = -SYSTEM_QUOTA_TTL
        self._on_disk_at_read = 0
        self.last: Quota | None = None  # the quota that applied at the last free()

    def current(self, on_disk: int) -> Quota | None:
        """The tighter of the two quotas given what the node has on disk now (`on_disk` bytes)."""
        options: list[Quota] = []
        if self.configured is not None:
            options.append(Quota(self.configured, on_disk, "cache.quota"))
        system = self._system_now(on_disk)
        if system is not None:
            options.append(system)
        return min(options, key=lambda q: q.headroom) if options else None

    def free(self, fs_free: int, on_disk: int) -> int:
        """Bytes the node may still write: the filesystem's free space, capped by the quota's headroom."""
        q = self.last = self.current(on_disk)
        return fs_free if q is None else min(fs_free, q.headroom)

    def _system_now(self, on_disk: int) -> Quota | None:
        if not self.read_system:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= SYSTEM_QUOTA_TTL:
                self._system = read_system_quota(self.path)
                self._read_at = now
                self._on_disk_at_read = on_disk
            q = self._system
            grown = on_disk - self._on_disk_at_read
        if q is None:
            return None
        # What the node wrote since the reading counts against the quota already.
        return Quota(q.limit, max(0, q.used + grown), q.source)
