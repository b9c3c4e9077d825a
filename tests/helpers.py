"""Small helpers shared by test files: what this process holds right now."""
from __future__ import annotations

import os
import threading
from typing import Tuple


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def resources() -> Tuple[int, int, int]:
    """Open fds, live threads, mapping lines of this process."""
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return open_fds(), threading.active_count(), maps


def uffd_fds() -> int:
    """Open userfaultfd descriptors of this process."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n
