"""Small helpers shared by test files: what this process holds right now, and more."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Type

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


# ------------------------------------------------------------------ running the command

ROOT = Path(__file__).resolve().parent.parent


def uffdpy_cmd(*args: object) -> List[str]:
    return [sys.executable, "-m", "uffdpy", *map(str, args)]


def run_uffdpy(*args: object, timeout: float = 120,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(uffdpy_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def popen_uffdpy(*args: object) -> "subprocess.Popen[str]":
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(uffdpy_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uffdpy: error: "), proc.stderr
    return lines[0]


def server_of(supervisor: "subprocess.Popen[str]", timeout: float = 30, *,
              started_qemu: bool = False) -> int:
    """The pid of the stream's server, the child ``uffdpy resume`` forks to connect and serve.

    ``started_qemu``: the command started its QEMU (the ``--`` form), its
    first child.  Then the server is the other child: until QEMU has exec'd,
    its name is still the command's, so a name alone cannot tell them apart.
    """
    deadline = time.monotonic() + timeout
    path = f"/proc/{supervisor.pid}/task/{supervisor.pid}/children"
    while True:
        with open(path) as f:
            children = f.read().split()
        if len(children) >= (2 if started_qemu else 1):
            for child in children:
                try:
                    with open(f"/proc/{child}/comm") as f:
                        if not f.read().startswith("qemu"):
                            return int(child)
                except FileNotFoundError:
                    pass
        assert supervisor.poll() is None and time.monotonic() < deadline, supervisor.poll()
        time.sleep(0.005)


@contextlib.contextmanager
def running(proc: "subprocess.Popen[str]") -> Iterator["subprocess.Popen[str]"]:
    """``proc`` while the block runs; killed and reaped after it if it still runs."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
