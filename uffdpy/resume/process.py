"""A destination QEMU that uffdpy starts itself (the ``--`` form of ``uffdpy resume``)."""
from __future__ import annotations

import os
import select
import shutil
from typing import Sequence

from ..qemu import Qemu, QemuError
from .destination import DestinationError

__all__ = ["QemuProcess"]


class QemuProcess(Qemu):
    """A destination QEMU that uffdpy starts: ``argv -incoming defer`` and a private QMP socket.

    It runs in its own session with its output in ``log_path``, so it
    outlives uffdpy; :meth:`kill` ends exactly this process group.
    Raises: DestinationError when QEMU cannot start.
    """

    def __init__(self, argv: Sequence[str], *, paused: bool, timeout: float = 30.0) -> None:
        try:
            super().__init__(argv, incoming="defer", paused=paused, timeout=timeout)
        except QemuError as e:
            raise DestinationError(e.message, e.reason) from None

    def leave_running(self) -> None:
        """Leave QEMU running after uffdpy exits; its directory (QMP socket, log) goes with it.

        A detached watcher (a grandchild in a session of its own, holding
        nothing but a pidfd of QEMU) waits for QEMU's exit and removes the
        directory.  Without pidfd_open (Linux < 5.3) the directory stays.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            return
        try:
            child = os.fork()
            if child == 0:
                try:
                    os.setsid()
                    if os.fork() == 0:
                        _watch_and_remove(pidfd, self.dir)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
        finally:
            os.close(pidfd)


def _watch_and_remove(pidfd: int, directory: str) -> None:
    """In the watcher: drop every other descriptor, wait for QEMU's exit, remove ``directory``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != pidfd:
            try:
                os.close(fd)
            except OSError:
                pass
    select.select([pidfd], [], [])               # readable once the process has exited
    shutil.rmtree(directory, ignore_errors=True)
