"""Small helpers shared by test files: what this process holds right now, and more."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Type

from uffdpy.loader import HAVE_INTERPRETERS

#: LazyLoader servers this Python can run: server="interpreter" needs an
#: own-GIL subinterpreter in which ctypes loads (3.13+)
LAZY_SERVERS = ["thread", "process"] + (["interpreter"] if HAVE_INTERPRETERS else [])


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False).

    The fault loop counts a page just after its ioctl woke the toucher, and an
    out-of-process server publishes its counters every 20 ms: poll a moment.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


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


def assert_loaders_refuse_without_leaks(paths: Sequence[object], error: Type[Exception]) -> None:
    """Both loaders refuse every file in ``paths`` with ``error``, leaving nothing behind.

    One round first lets the allocator's arenas and caches settle; then three
    more rounds must not change the fds, threads or mappings of this process,
    and no userfaultfd may be open.
    """
    import pytest
    from uffdpy.loader import EagerLoader, LazyLoader

    def attempt() -> None:
        for p in paths:
            for cls in (LazyLoader, EagerLoader):
                with pytest.raises(error):
                    cls(str(p))
    attempt()
    before = resources()
    for _ in range(3):
        attempt()
    assert resources() == before                  # no fd, thread or mapping per attempt
    assert uffd_fds() == 0


def write_files(folder: Path, contents: Dict[str, bytes], suffix: str) -> List[Path]:
    """``folder/NAME{suffix}`` for each name (spaces made underscores), holding its bytes."""
    paths = []
    for name, content in contents.items():
        path = folder / f"{name.replace(' ', '_')}{suffix}"
        path.write_bytes(content)
        paths.append(path)
    return paths
