"""``server="interpreter"``: the workers in an own-GIL subinterpreter (see :mod:`.server`).

Here: ``InterpreterServer`` (a host thread of this interpreter sits in
``Interpreter.run`` for the whole load), ``prepare_interpreter_servers`` over
the pool of idle subinterpreters (``hosting.Interpreter``), and
``_interpreter_main``, the server's body, run inside the subinterpreter.
"""
from __future__ import annotations

import json
import os
import select
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..uffd import Userfaultfd
from .claims import ClaimMap
from .errors import LoaderError
from .hosting import (HAVE_INTERPRETERS, Interpreter, destroy_idle_interpreters,
                      error_report, interpreters_module, prepare_interpreters, read_report,
                      serve_until_ended, write_report)
from .options import WorkerOptions
from .placement import Region, SharedRegion, fence
from .server import STOP_TIMEOUT, Job, Report, Server
from .threads import start_thread
from ..wake import WakeFd, eventfd, signal_fd
from .workers import Workers

__all__ = ["HAVE_INTERPRETERS", "InterpreterServer", "prepare_interpreter_servers",
           "release_interpreter_servers"]

#: Seconds an interpreter server may take to start before the load is abandoned.
INTERPRETER_START_TIMEOUT = 60.0


class InterpreterServer(Server):
    """Run both workers in a subinterpreter with its own GIL, from a host thread here."""

    name = "interpreter"
    stop_before_exit = True

    def __init__(self) -> None:
        super().__init__()
        self.host: Optional[threading.Thread] = None
        self.host_done = threading.Event()
        #: what the subinterpreter reported, once the host thread has it
        self.report: Optional[Report] = None

    @classmethod
    def check_available(cls) -> None:
        interpreters_module()

    def start(self, job: Job, on_end: Callable[[Report], None]) -> None:
        """Start the workers in a subinterpreter with its own GIL; return once they run.

        The spec carries numbers only (fds, addresses): the subinterpreter
        shares this address space and fd table, so it serves from this
        process's file mapping, into these mappings, through a dup of this
        uffd, with a second view of the claim map's memfd.

        Raises:
            LoaderError: it did not start within ``INTERPRETER_START_TIMEOUT``,
                or it failed before it started (the failure says why).
        """
        self.job = job
        interp = Interpreter.take()
        started_fd = eventfd()
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(started_fd)
            interp.give_back()
            raise
        spec = {
            "uffd": job.uffd.fileno(), "wake": job.wake.fd, "started": started_fd,
            "report": report_w, "claims": job.claims.fd, "file_map": job.file.address,
            "file_fd": job.file.fd, "path": job.file.path,
            "unit": job.unit, "options": job.options.as_dict(),
            "working_set": job.working_set, "record_demand": job.record_demand,
            "t0_ns": job.t0_ns,
            "regions": [{"name": r.name, "length": r.source.length, "page_size": r.page_size,
                         "pages": r.pages, "file_offset": r.file_offset,
                         "file_bytes": r.source.file_bytes, "start": r.start}
                        for r in job.regions],
        }
        bitmaps = tuple(bytes(r.bitmap) for r in job.regions)
        host = threading.Thread(
            target=self._host_interpreter, name="uffdpy-interpreter-host", daemon=True,
            args=(interp, json.dumps(spec), bitmaps, report_r, report_w, on_end))
        try:
            start_thread(host)
        except BaseException:
            for fd in (started_fd, report_r, report_w):
                os.close(fd)
            interp.give_back()
            raise
        self.host = host
        # The subinterpreter signals started_fd once, when its workers run;
        # once it has, or once it has ended, nobody writes it again and it
        # can be closed.  After a timeout it might still: it stays open.
        deadline = time.monotonic() + INTERPRETER_START_TIMEOUT
        while True:
            started = bool(select.select([started_fd], [], [], 0.05)[0])
            if started or self.host_done.is_set() or time.monotonic() > deadline:
                # a fast load may have started and ended since the select
                started = started or bool(select.select([started_fd], [], [], 0)[0])
                break
        if started or self.host_done.is_set():
            os.close(started_fd)
        if started:
            return
        if not self.host_done.is_set():
            self._stop_interpreter_server()
            raise LoaderError(f"the interpreter server did not start within "
                              f"{INTERPRETER_START_TIMEOUT:.0f} s")
        self.host.join()                    # on_end has run
        error = self.report.error if self.report is not None else None
        if isinstance(error, LoaderError):
            raise error
        raise LoaderError("the interpreter server ended before it started")

    def _host_interpreter(self, interp: Interpreter, spec: str, bitmaps: Tuple[bytes, ...],
                          report_r: int, report_w: int,
                          on_end: Callable[[Report], None]) -> None:
        """The host thread: run the server in the subinterpreter, then hand on its report.

        ``Interpreter.run`` switches this thread to the subinterpreter's own
        GIL, so this process's GIL is free for the whole load.
        """
        assert self.job is not None
        failure = interp.run("uffdpy.loader.server_interpreter:_interpreter_main",
                             {"spec": spec, "bitmaps": bitmaps})
        os.close(report_w)
        try:
            line = read_report(report_r)
        finally:
            os.close(report_r)
        if not line:
            line = {"error": failure or "the interpreter server ended without a report"}
        clean = failure is None and not line.get("error")
        try:
            report = self.report = Report.from_line(line, self.job.claims)
        finally:
            if clean:
                interp.give_back()
            else:                          # it may have left a thread behind
                interp.destroy()
            self.host_done.set()
        on_end(report)                     # the interpreter is free by now

    def _stop_interpreter_server(self, timeout: float = STOP_TIMEOUT) -> None:
        host = self.host
        if host is None:
            return
        if self.job is not None:
            self.job.wake.signal()
        host.join(timeout)

    def stop(self) -> bool:
        if self.host is None:
            return True
        self._stop_interpreter_server()
        # Alive: stuck, it may still use the uffd, the file mapping, the
        # claims and the memory.  The loader leaks them rather than pull them away.
        return not self.host.is_alive()


def prepare_interpreter_servers(count: int = 1) -> None:
    """Create ``count`` idle interpreter servers now, so the next loads are ready at once.

    The first ``server="interpreter"`` load otherwise spends ~150 ms (here)
    making a subinterpreter and importing uffdpy in it.  Idle
    ones are destroyed before any ``os.fork()`` (CPython 3.13 cannot fork
    with subinterpreters alive) and at exit.

    Raises:
        LoaderError: Python is older than 3.13, or the interpreter failed to start.
    """
    prepare_interpreters(count)


def release_interpreter_servers() -> None:
    """Destroy the idle interpreter servers (``prepare_interpreter_servers`` made, or loads left).

    Happens anyway before any ``os.fork()`` and at exit; call it to do it at
    a time of your choosing (destroying one takes ~10-20 ms).
    """
    destroy_idle_interpreters()


def _interpreter_main(spec: str, bitmaps: Sequence[bytes]) -> None:
    """Body of an interpreter server (runs inside the subinterpreter): serve, report.

    Never raises: the outcome is the JSON line written to the spec's ``report`` fd.
    On a failure it fences the pages nobody placed itself (``PROT_NONE`` and
    wake), because the loading interpreter may be unable to: one of its
    threads may be asleep on an unserved page while holding its GIL.
    """
    job = json.loads(spec)
    uffd: Optional[Userfaultfd] = None
    claims: Optional[ClaimMap] = None
    server: Optional[Workers] = None
    regions: List[Region] = []
    report: Dict[str, Any]
    try:
        uffd = Userfaultfd.from_fd(os.dup(job["uffd"]), created_via="interpreter")
        regions = [Region(i, SharedRegion(fields, bitmaps[i]), fields["start"],
                           job["file_map"], job["unit"])
                   for i, fields in enumerate(job["regions"])]
        claims = ClaimMap.attach(job["claims"], [r.units for r in regions])
        server = Workers(uffd, regions, claims, WakeFd(job["wake"]),
                         WorkerOptions.from_dict(job["options"]), daemon_threads=False,
                         file_fd=job["file_fd"], path=job["path"],
                         working_set=job["working_set"], record_demand=job["record_demand"],
                         t0_ns=job["t0_ns"])
        report = serve_until_ended(server, started=lambda: signal_fd(job["started"]))
    except BaseException as exc:  # noqa: BLE001 - reported to the loading interpreter
        report = error_report(exc)
        if server is not None:
            server.stop()
            server.join(30.0)
        if uffd is not None and claims is not None:
            fence(regions, claims, uffd)
    finally:
        if server is not None:
            server.close_buffers()
        if claims is not None:
            claims.close()
        if uffd is not None:
            uffd.close()
    write_report(job["report"], report)
