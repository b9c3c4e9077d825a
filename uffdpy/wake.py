"""The eventfd that wakes a poll loop: one for the loader's fault loop and the resume's.

``WakeFd()`` makes one (non-blocking, close-on-exec); :meth:`WakeFd.signal`
from any thread makes it readable, :meth:`WakeFd.drain` reads it back to
quiet, :meth:`WakeFd.close` closes it once (a signal after that is dropped).
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Optional

__all__ = ["WakeFd", "eventfd", "signal_fd"]


class WakeFd:
    """The eventfd that wakes a fault loop out of ``poll``: signalled from any
    thread, closed once, and a signal after the close does nothing.

    The loader makes it and closes it at teardown; the workers and the
    servers only signal it.  ``WakeFd(fd)`` wraps one made elsewhere (a
    subinterpreter's workers get the loader's fd number) and is never closed
    by whoever holds it that way.
    """

    def __init__(self, fd: Optional[int] = None) -> None:
        self.fd = eventfd() if fd is None else fd
        self._lock = threading.Lock()

    def signal(self) -> None:
        with self._lock:
            if self.fd >= 0:
                signal_fd(self.fd)

    def drain(self) -> None:
        """Read the counter back to zero (nothing to read is no error)."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close the eventfd (idempotent): after this, signals are dropped."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def signal_fd(fd: int) -> None:
    try:
        os.write(fd, struct.pack("=Q", 1))
    except (BlockingIOError, OSError):
        pass  # already signalled (counter full) or closed during shutdown


def eventfd() -> int:
    if hasattr(os, "eventfd"):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    from . import ioctl                                     # Python < 3.10: libc's
    return ioctl.libc.eventfd(0, ioctl.EFD_CLOEXEC | ioctl.EFD_NONBLOCK)

