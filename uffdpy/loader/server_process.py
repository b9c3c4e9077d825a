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
from typing import Callable, Optional

from .. import ioctl
from .errors import ServerDiedError
from .hosting import ForkedChild, check_fork_allowed, serve_until_ended
from .server import STOP_TIMEOUT, Job, Report, Server, live_stats
from .threads import start_thread
from .workers import Workers

__all__ = ["ProcessServer"]


class ProcessServer(Server):
    """Fork a server process that runs both workers; watch it, reap it."""

    name = "process"

    def __init__(self) -> None:
        super().__init__()
        self.child: Optional[ForkedChild] = None
        self.monitor: Optional[threading.Thread] = None
        #: this process's copy of the workers the child runs (their buffers are freed here)
        self.forked: Optional[Workers] = None

    @classmethod
    def check_available(cls) -> None:
        check_fork_allowed()

    def start(self, job: Job, on_end: Callable[[Report], None]) -> None:
        self.job = job
        workers = self.forked = job.workers()
        # Keep the guest memory out of the child: it must never own a copy.
        for m in job.memory:
            m.madvise(ioctl.MADV_DONTFORK)
        child = self.child = ForkedChild(lambda: serve_until_ended(workers))
        self.pid = child.pid
        # The parent needs no file mapping: the child serves from its own copy.
        job.file.close()
        monitor = threading.Thread(target=self._watch_child, args=(child, job, on_end),
                                   name="uffdpy-server-watch", daemon=True)
        try:
            start_thread(monitor)
        except BaseException:
            # Nobody would watch the server: end it now (it has served
            # nothing: ready is not reported yet) and reap it.
            child.kill()
            child.wait()
            self.pid = 0
            raise
        self.monitor = monitor

    def _watch_child(self, child: ForkedChild, job: Job,
                     on_end: Callable[[Report], None]) -> None:
        """The monitor thread: hand on the server's one-line report, then reap it.

        The report is handed on as soon as its line arrives, before the child
        has exited (tearing down a forked address space takes milliseconds
        that the load need not wait for).  No report by EOF means it died.
        """
        line = child.read_report()
        if line:
            on_end(Report.from_line(line, job.claims))
        pid = child.pid
        status = child.wait()
        self.pid = 0
        if not line:                                 # with what it did before it died
            on_end(Report(complete=False, stats=live_stats(job.claims),
                          error=_server_died(pid, status)))

    def finished(self) -> None:
        assert self.job is not None
        for m in self.job.memory:
            m.madvise(ioctl.MADV_DOFORK)
        self._free_buffers()

    def stop(self) -> bool:
        if self.job is not None and self.pid:
            self.job.wake.signal()             # the wake fd: the child sees it too
            self._reap_child(timeout=5.0)
        if self.monitor is not None:
            self.monitor.join(timeout=STOP_TIMEOUT)
        return True

    def _reap_child(self, timeout: float) -> None:
        """Wait for the server to leave after a stop request; kill it if it does not."""
        assert self.monitor is not None and self.child is not None
        self.monitor.join(timeout)
        if self.monitor.is_alive():
            self.child.kill()

    def _free_buffers(self) -> None:
        if self.forked is not None:
            self.forked.close_buffers()

    def close(self) -> None:
        self._free_buffers()
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
