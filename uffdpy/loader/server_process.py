"""``server="process"``: the workers in a forked server process (see :mod:`.server`).

The parent keeps the uffd (a dying server never lets the kernel zero-fill
pending faults), keeps guest memory out of the child (``MADV_DONTFORK``
until the load is complete), forks the child with ``hosting.ForkedChild``
(whose body is ``hosting.serve_until_ended``, as in the interpreter server),
watches its one-line report from a monitor thread, and reaps it, or kills it
when it does not leave.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import ioctl
from .errors import ServerDiedError
from .hosting import ForkedChild, check_fork_allowed, serve_until_ended
from .server import Server
from .workers import _start_thread

if TYPE_CHECKING:                      # for annotations only: lazy imports this module
    from .lazy import LazyLoader

__all__ = ["ProcessServer"]


class ProcessServer(Server):
    """Fork a server process that runs both workers; watch it, reap it."""

    name = "process"

    def __init__(self, loader: "LazyLoader") -> None:
        super().__init__(loader)
        self.child: Optional[ForkedChild] = None
        self.monitor: Optional[threading.Thread] = None

    @classmethod
    def check_available(cls) -> None:
        check_fork_allowed()

    def start(self, unit: int, options: Dict[str, Any]) -> None:
        loader = self.loader
        workers = loader._workers = self._workers(options)
        assert loader._file_map is not None
        # Keep the guest memory out of the child: it must never own a copy.
        for m in loader._mappings.values():
            m.madvise(ioctl.MADV_DONTFORK)
        child = self.child = ForkedChild(lambda: serve_until_ended(workers))
        self.pid = child.pid
        # The parent needs no file mapping: the child serves from its own copy.
        loader._file_map.close()
        os.close(loader._file_fd)
        loader._file_fd = -1
        monitor = threading.Thread(target=self._watch_child, name="uffdpy-server-watch",
                                   daemon=True)
        try:
            _start_thread(monitor)
        except BaseException:
            # Nobody would watch the server: end it now (it has served
            # nothing: ready is not reported yet) and reap it.
            child.kill()
            child.wait()
            self.pid = 0
            raise
        self.monitor = monitor

    def _watch_child(self) -> None:
        """The monitor thread: act on the server's one-line report, then reap it.

        The report is acted on as soon as its line arrives, before the child
        has exited (tearing down a forked address space takes milliseconds
        that the load need not wait for).  No report by EOF means it died.
        """
        loader = self.loader
        child = self.child
        assert child is not None
        report = child.read_report()
        if report:
            self._act_on_report(report)
            loader._done.set()
        pid = child.pid
        status = child.wait()
        self.pid = 0
        if not report:
            self._read_live(loader._stats)         # what it did before it died
            loader._fail(_server_died(pid, status))
            loader._fence_unplaced()
            loader._done.set()

    def finished(self) -> None:
        for m in self.loader._mappings.values():
            m.madvise(ioctl.MADV_DOFORK)

    def stop(self) -> bool:
        workers = self.loader._workers
        if workers is not None and self.pid:
            workers.stop()                     # the wake fd: the child sees it too
            self._reap_child(timeout=5.0)
        if self.monitor is not None:
            self.monitor.join(timeout=30.0)
        return True

    def _reap_child(self, timeout: float) -> None:
        """Wait for the server to leave after a stop request; kill it if it does not."""
        assert self.monitor is not None and self.child is not None
        self.monitor.join(timeout)
        if self.monitor.is_alive():
            self.child.kill()

    def close(self) -> None:
        if self.child is not None:
            self.child.close()


def _server_died(pid: int, status: int) -> ServerDiedError:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        how = f"was killed by signal {sig} ({signal.Signals(sig).name})"
        return ServerDiedError(_DIED.format(pid=pid, how=how), pid=pid, signal_number=sig)
    code = os.WEXITSTATUS(status)
    return ServerDiedError(_DIED.format(pid=pid, how=f"exited with status {code}"),
                           pid=pid, status=code)


_DIED = ("the fault server process (pid {pid}) {how} before every page was placed; "
         "pages it had not placed stay inaccessible (never zero-filled)")
