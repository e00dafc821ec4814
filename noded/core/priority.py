"""Thread priorities (Linux: per thread). The event loop thread answers the API, peers and systemd's
watchdog; bulk work (receiving dataset bodies, hashing them) takes every spare cycle but yields to it,
so a pull at full speed does not make /healthz late."""

from __future__ import annotations

import contextlib
import os
import threading

BULK_NICE = 5  # added to the process's own nice value: bulk threads below the loop, not idle


def bulk_thread() -> None:
    """Thread-pool initializer: this thread runs BULK_NICE below the process (loop) priority."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BULK_NICE))


def idle_thread() -> None:
    """Thread-pool initializer: this thread only gets CPU the others leave free (SCHED_IDLE, else nice 19)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid, 19)
