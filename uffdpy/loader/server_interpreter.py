"""``server="interpreter"``: the workers in an own-GIL subinterpreter (see :mod:`.server`).

Here: ``InterpreterServer`` (a host thread of this interpreter sits in
``_interpreters.exec`` for the whole load), the pool of idle
subinterpreters (``prepare_interpreter_servers``), and
``_interpreter_main``, the server's body, run inside the subinterpreter.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import sys
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..uffd import Userfaultfd
from .claims import ClaimMap
from .errors import LoaderError
from .placement import _fence, _Region, _SharedRegion
from .server import Server, _describe_error, _read_report
from .stats import Stats
from .workers import _eventfd, Workers, _signal_fd, _start_thread

if TYPE_CHECKING:                      # for annotations only: lazy imports this module
    from .lazy import LazyLoader

__all__ = ["HAVE_INTERPRETERS", "InterpreterServer", "prepare_interpreter_servers",
           "release_interpreter_servers"]

#: Whether this Python can run ``server="interpreter"``: own-GIL subinterpreters
#: in which ctypes loads, with the ``_interpreters`` module (CPython 3.13+).
HAVE_INTERPRETERS = importlib.util.find_spec("_interpreters") is not None
#: Seconds an interpreter server may take to start before the load is abandoned.
INTERPRETER_START_TIMEOUT = 60.0


class InterpreterServer(Server):
    """Run both workers in a subinterpreter with its own GIL, from a host thread here."""

    name = "interpreter"

    def __init__(self, loader: "LazyLoader") -> None:
        super().__init__(loader)
        self.host: Optional[threading.Thread] = None
        self.host_done = threading.Event()

    @classmethod
    def check_available(cls) -> None:
        _interpreters_module()

    def start(self, unit: int, options: Dict[str, Any]) -> None:
        """Start the workers in a subinterpreter with its own GIL; return once they run.

        The spec carries numbers only (fds, addresses): the subinterpreter
        shares this address space and fd table, so it serves from this
        process's file mapping, into these mappings, through a dup of this
        uffd, with a second view of the claim map's memfd.
        """
        loader = self.loader
        assert loader._uffd is not None and loader._file_map is not None
        assert loader._claims is not None
        source = loader.source
        interp = _take_interpreter()
        started_fd = _eventfd()
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(started_fd)
            _give_back_interpreter(interp)
            raise
        spec = {
            "uffd": loader._uffd.fileno(), "wake": loader._wake_fd, "started": started_fd,
            "report": report_w, "claims": loader._claims.fd,
            "file_map": loader._file_map.address,
            "file_fd": loader._file_fd, "path": source.path,
            "unit": unit, "options": options,
            "regions": [{"name": r.name, "length": r.length, "page_size": r.page_size,
                         "pages": r.pages, "file_offset": r.file_offset,
                         "file_bytes": r.file_bytes,
                         "start": loader._mappings[r.name].address} for r in source.regions],
        }
        bitmaps = tuple(bytes(r.bitmap) for r in source.regions)
        host = threading.Thread(
            target=self._host_interpreter, name="uffdpy-interpreter-host", daemon=True,
            args=(interp, json.dumps(spec), bitmaps, report_r, report_w))
        try:
            _start_thread(host)
        except BaseException:
            for fd in (started_fd, report_r, report_w):
                os.close(fd)
            _give_back_interpreter(interp)
            raise
        self.host = host
        _live_interpreter_loaders.add(loader)
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
        self.host.join()
        loader._error_reported = True
        loader._raise_error()
        raise LoaderError("the interpreter server ended before it started")

    def _host_interpreter(self, interp: int, spec: str, bitmaps: Tuple[bytes, ...],
                          report_r: int, report_w: int) -> None:
        """The host thread: run the server in the subinterpreter, then act on its report.

        ``exec`` switches this thread to the subinterpreter's own GIL, so
        this process's GIL is free for the whole load.
        """
        failure = None
        try:
            excinfo = _interpreters_module().exec(interp, _INTERPRETER_CODE,
                                                  shared={"spec": spec, "bitmaps": bitmaps})
            if excinfo is not None:
                failure = _describe_failure(excinfo)
        except BaseException as exc:  # noqa: BLE001 - reported like a server failure
            failure = f"{type(exc).__name__}: {exc}"
        os.close(report_w)
        try:
            report = _read_report(report_r)
        finally:
            os.close(report_r)
        if not report:
            report = {"error": failure or "the interpreter server ended without a report"}
        clean = failure is None and not report.get("error")
        try:
            self._act_on_report(report)
        finally:
            if clean:
                _give_back_interpreter(interp)
            else:
                _destroy_interpreter(interp)
            self.host_done.set()
            self.loader._done.set()

    def _stop_interpreter_server(self, timeout: float = 30.0) -> None:
        host = self.host
        if host is None:
            return
        loader = self.loader
        with loader._fd_lock:
            if loader._wake_fd >= 0:
                _signal_fd(loader._wake_fd)
        host.join(timeout)

    def stop(self) -> bool:
        if self.host is None:
            return True
        loader = self.loader
        self._stop_interpreter_server()
        _live_interpreter_loaders.discard(loader)
        if self.host.is_alive():
            # Stuck: it may still use the uffd, the file mapping, the
            # claims and the memory.  Leak them rather than pull them away.
            loader._fail(LoaderError("the interpreter server did not stop within 30 s"))
            return False
        return True


# ------------------------------------------------------------- interpreter servers
#
# A subinterpreter made with the "isolated" config has its own GIL (PEP 684).
# Python 3.12 has them too, but its ctypes refuses to load in one; 3.13 is the
# first where this works.  Interpreters are pooled: making one and importing
# uffdpy in it costs ~150 ms here, reusing one costs nothing, so only
# the first load in a process (or none, after prepare_interpreter_servers())
# pays for it.  CPython 3.13 aborts a child forked while any subinterpreter
# exists ("PyThreadState_Get: ... GIL is released"), so idle ones are
# destroyed before every os.fork(), and a process server (which forks) is
# refused while an interpreter server runs.

_pool_lock = threading.Lock()
_idle_interpreters: List[int] = []
_running_interpreters: set = set()

_INTERPRETER_CODE = ("import uffdpy.loader.server_interpreter\n"
                     "uffdpy.loader.server_interpreter._interpreter_main(spec, bitmaps)\n"
                     "del spec, bitmaps\n")


def _interpreters_module() -> Any:
    try:
        import _interpreters  # type: ignore[import-not-found]  # CPython >= 3.13
    except ImportError:
        raise LoaderError(
            f"server='interpreter' needs Python 3.13 or newer (a subinterpreter with its "
            f"own GIL in which ctypes loads); this is Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: use server='process' "
            f"for plain Python access during the load") from None
    return _interpreters


def _describe_failure(excinfo: Any) -> str:
    """One line from the exception snapshot that ``_interpreters.exec`` returns."""
    formatted = getattr(excinfo, "formatted", None) or getattr(excinfo, "msg", None)
    return str(formatted or excinfo)


def _new_interpreter() -> int:
    interps = _interpreters_module()
    interp = interps.create(interps.new_config("isolated"))
    # uffdpy/loader/server_interpreter.py -> the directory holding uffdpy/
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = tuple([package_parent] + [p for p in sys.path if p != package_parent])
    try:
        excinfo = interps.exec(interp, "import sys\nsys.path[:] = paths\n"
                               "import uffdpy.loader.server_interpreter\n"
                               "del paths\n", shared={"paths": paths})
    except BaseException:
        interps.destroy(interp)
        raise
    if excinfo is not None:
        interps.destroy(interp)
        raise LoaderError(f"could not start an interpreter server: "
                          f"{_describe_failure(excinfo)}")
    return interp


def _take_interpreter() -> int:
    with _pool_lock:
        interp = _idle_interpreters.pop() if _idle_interpreters else None
    if interp is None:
        interp = _new_interpreter()
    with _pool_lock:
        _running_interpreters.add(interp)
    return interp


def _give_back_interpreter(interp: int) -> None:
    with _pool_lock:
        _running_interpreters.discard(interp)
        _idle_interpreters.append(interp)


def _destroy_interpreter(interp: int) -> None:
    with _pool_lock:
        _running_interpreters.discard(interp)
    try:
        _interpreters_module().destroy(interp)
    except Exception:  # noqa: BLE001 - already gone, or still running: nothing to do
        pass


def _destroy_idle_interpreters() -> None:
    with _pool_lock:
        idle = list(_idle_interpreters)
        _idle_interpreters.clear()
    for interp in idle:
        _destroy_interpreter(interp)


def prepare_interpreter_servers(count: int = 1) -> None:
    """Create ``count`` idle interpreter servers now, so the next loads are ready at once.

    The first ``server="interpreter"`` load otherwise spends ~150 ms (here)
    making a subinterpreter and importing uffdpy in it.  Idle
    ones are destroyed before any ``os.fork()`` (CPython 3.13 cannot fork
    with subinterpreters alive) and at exit.

    Raises:
        LoaderError: Python is older than 3.13, or the interpreter failed to start.
    """
    while True:
        with _pool_lock:
            if len(_idle_interpreters) >= count:
                return
        interp = _new_interpreter()
        with _pool_lock:
            _idle_interpreters.append(interp)


def release_interpreter_servers() -> None:
    """Destroy the idle interpreter servers (``prepare_interpreter_servers`` made, or loads left).

    Happens anyway before any ``os.fork()`` and at exit; call it to do it at
    a time of your choosing (destroying one takes ~10-20 ms).
    """
    _destroy_idle_interpreters()


def _check_fork_allowed() -> None:
    with _pool_lock:
        running = len(_running_interpreters)
    if running:
        raise LoaderError(
            f"server='process' forks, and {running} interpreter server(s) are loading: "
            f"CPython aborts a child forked while a subinterpreter exists; wait for them "
            f"or close them first, or use server='interpreter' here too")


def _close_interpreter_loaders() -> None:
    """At exit: stop every interpreter server still loading (a loader never closed).

    Without this the interpreter hangs at exit: CPython will not finalize a
    subinterpreter that a thread is still running.  Runs before the idle
    ones are destroyed (atexit is last in, first out).
    """
    for loader in list(_live_interpreter_loaders):
        loader.close(_raise=False)


#: LazyLoaders whose interpreter server may still be running
_live_interpreter_loaders: "weakref.WeakSet[LazyLoader]" = weakref.WeakSet()
atexit.register(_destroy_idle_interpreters)
atexit.register(_close_interpreter_loaders)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_destroy_idle_interpreters)



def _interpreter_main(spec_json: str, bitmaps: Sequence[bytes]) -> None:
    """Body of an interpreter server (runs inside the subinterpreter): serve, report.

    Never raises: the outcome is the JSON line written to ``spec["report"]``.
    On a failure it fences the pages nobody placed itself (``PROT_NONE`` and
    wake), because the loading interpreter may be unable to: one of its
    threads may be asleep on an unserved page while holding its GIL.
    """
    spec = json.loads(spec_json)
    uffd: Optional[Userfaultfd] = None
    claims: Optional[ClaimMap] = None
    server: Optional[Workers] = None
    regions: List[_Region] = []
    report: Dict[str, Any]
    try:
        uffd = Userfaultfd.from_fd(os.dup(spec["uffd"]), created_via="interpreter")
        regions = [_Region(i, _SharedRegion(fields, bitmaps[i]), fields["start"],
                           spec["file_map"], spec["unit"])
                   for i, fields in enumerate(spec["regions"])]
        claims = ClaimMap.attach(spec["claims"], [r.units for r in regions])
        server = Workers(uffd, regions, claims, spec["wake"], daemon_threads=False,
                         file_fd=spec["file_fd"], path=spec["path"], **spec["options"])
        server.go.set()
        server.start()
        _signal_fd(spec["started"])
        while not server.ended.wait(0.02):
            server.publish_counters()         # the loader's live stats
        for t in server.threads:              # the loop thread joins the others last
            t.join()
        server.publish_counters()
        if server.error is not None:
            raise server.error
        complete = claims.complete.is_set()
        report = {"complete": complete, "stopped": not complete,
                  "stats": server.merged_stats(Stats()).as_dict(),
                  "demanded": server.demanded}
    except BaseException as exc:  # noqa: BLE001 - reported to the loading interpreter
        report = {"error": _describe_error(exc), "traceback": traceback.format_exc()}
        if server is not None:
            server.stop()
            server.join(30.0)
        if uffd is not None and claims is not None:
            _fence(regions, claims, uffd)
    finally:
        if server is not None:
            server.close_buffers()
        if claims is not None:
            claims.close()
        if uffd is not None:
            uffd.close()
    data = json.dumps(report).encode() + b"\n"
    while data:
        data = data[os.write(spec["report"], data):]
