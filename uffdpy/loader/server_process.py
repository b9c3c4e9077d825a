"""``server="process"``: the workers in a forked server process (see :mod:`.server`).

The parent keeps the uffd (a dying server never lets the kernel zero-fill
pending faults), keeps guest memory out of the child (``MADV_DONTFORK``
until the load is complete), watches the child's one-line report from a
monitor thread, and reaps it, or kills it when it does not leave.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import ioctl
from .errors import ServerDiedError
from .server import Server, _describe_error, _read_report
from .server_interpreter import _check_fork_allowed
from .stats import Stats
from .threads import release_thread_pool
from .workers import Workers, _start_thread

if TYPE_CHECKING:                      # for annotations only: lazy imports this module
    from .lazy import LazyLoader

__all__ = ["ProcessServer"]


class ProcessServer(Server):
    """Fork a server process that runs both workers; watch it, reap it."""

    name = "process"

    def __init__(self, loader: "LazyLoader") -> None:
        super().__init__(loader)
        self.pid = 0
        self.result_fd = -1
        self.monitor: Optional[threading.Thread] = None

    @classmethod
    def check_available(cls) -> None:
        _check_fork_allowed()

    def start(self, unit: int, options: Dict[str, Any]) -> None:
        loader = self.loader
        server = loader._workers = self._workers(options)
        assert loader._file_map is not None
        # Keep the guest memory out of the child: it must never own a copy.
        for m in loader._mappings.values():
            m.madvise(ioctl.MADV_DONTFORK)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
        parent = os.getpid()
        # idle pooled threads would make this fork one of a multi-threaded
        # process (a deadlock risk CPython warns of): end them first
        release_thread_pool()
        pid = os.fork()
        if pid == 0:                                   # the server process
            os.close(read_fd)
            _child_main(server, write_fd, parent)
        os.close(write_fd)
        self.pid = pid
        self.result_fd = read_fd
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
            self.pid = 0
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise
        self.monitor = monitor

    def _watch_child(self) -> None:
        """The monitor thread: act on the server's one-line report, then reap it.

        The report is acted on as soon as its line arrives, before the child
        has exited (tearing down a forked address space takes milliseconds
        that the load need not wait for).  No report by EOF means it died.
        """
        loader = self.loader
        report = _read_report(self.result_fd)
        if report:
            self._act_on_report(report)
            loader._done.set()
        pid = self.pid
        _, status = os.waitpid(pid, 0)
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
        server = self.loader._workers
        if server is not None and self.pid:
            server.stop()
            self._reap_child(timeout=5.0)
        if self.monitor is not None:
            self.monitor.join(timeout=30.0)
        return True

    def _reap_child(self, timeout: float) -> None:
        """Wait for the server to leave after a stop request; kill it if it does not."""
        deadline = time.monotonic() + timeout
        assert self.monitor is not None
        self.monitor.join(max(0.0, deadline - time.monotonic()))
        if self.monitor.is_alive() and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.result_fd >= 0:
            os.close(self.result_fd)
            self.result_fd = -1


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


def _child_main(server: Workers, result_fd: int, parent: int) -> None:
    """Body of the forked server process: serve, report, leave with ``os._exit``."""
    code = 0
    report: Dict[str, Any]
    try:
        # Die with the loading process: its memory is what we serve.
        ioctl.libc.prctl(ioctl.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.go.set()
        server.start()
        complete = server.claims.complete
        while not server.ended.wait(0.02):
            server.publish_counters()              # the loader's live stats
        if server.error is not None:
            raise server.error
        stats = server.merged_stats(Stats()).as_dict()
        report = {"complete": complete.is_set(), "stopped": not complete.is_set(),
                  "stats": stats, "demanded": server.demanded}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        code = 1
        report = {"error": _describe_error(exc), "traceback": traceback.format_exc()}
    try:
        server.publish_counters()
        data = json.dumps(report).encode() + b"\n"     # one line: the parent acts on it
        while data:
            data = data[os.write(result_fd, data):]
    finally:
        os._exit(code)
