"""Work that runs outside this interpreter's GIL, and the one report it sends back.

The process and interpreter servers (and ``scripts/bench_fault.py``'s minimal
handler) run their work where this interpreter's GIL does not reach:

* :class:`ForkedChild` forks a child that runs ``body()`` and leaves with
  ``os._exit``.  The child dies with its parent (``PR_SET_PDEATHSIG``), since
  what it serves is the parent's memory, and ignores SIGINT (a Ctrl-C is the
  parent's to handle).
* :class:`Interpreter` is an own-GIL subinterpreter (Python 3.13+, PEP 684)
  taken from a pool, in which :meth:`Interpreter.run` calls
  ``module.function(**shared)`` from the calling thread, which holds the
  subinterpreter's GIL meanwhile and leaves this one's free.

Both send their outcome the same way, the one report channel: a JSON object
on one line of a pipe (:func:`write_report`, :func:`read_report`), written
once when the work has ended.  A report is ``{"complete": true, ...}``,
``{"stopped": true, ...}`` or ``{"error": "one line", "traceback": ...}``;
:func:`serve_until_ended` runs a load's workers and makes the first two, and
:func:`error_report` the third.  While the workers run, their counters go
the other way, through the claim map's header (``Workers.publish_counters``),
so the loader's live stats need no second channel.

Interpreters are pooled because making one and importing uffdpy in it costs
~150 ms here and reusing one costs nothing.  CPython 3.13 aborts a child
forked while any subinterpreter exists ("PyThreadState_Get: ... the GIL is
released"), so idle ones are destroyed before every ``os.fork()`` (an
at-fork hook) and at exit, and a fork is refused while one is running
(:func:`check_fork_allowed`).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from .. import ioctl
from .errors import LoaderError
from .stats import Stats
from .threads import release_thread_pool

if TYPE_CHECKING:
    from .workers import Workers

__all__ = ["HAVE_INTERPRETERS", "ForkedChild", "Interpreter", "check_fork_allowed",
           "error_report", "read_report", "serve_until_ended", "write_report"]

#: Whether this Python has own-GIL subinterpreters in which ctypes loads,
#: with the ``_interpreters`` module (CPython 3.13+).
HAVE_INTERPRETERS = importlib.util.find_spec("_interpreters") is not None

Report = Dict[str, Any]


# ------------------------------------------------------------------ the report
def serve_until_ended(workers: "Workers",
                      started: Optional[Callable[[], None]] = None) -> Report:
    """Run ``workers`` to their end here and return their report (complete or stopped).

    ``started`` runs once they run.  Their counters are published in the
    claim map's header every 20 ms meanwhile, and once more at the end,
    whatever the outcome.

    Raises:
        BaseException: what stopped the workers (``Workers.error``).
    """
    try:
        workers.go.set()
        workers.start()
        if started is not None:
            started()
        while not workers.ended.wait(0.02):
            workers.publish_counters()
        for t in workers.threads:              # the loop thread joins the others last
            t.join()
        if workers.error is not None:
            raise workers.error
        complete = workers.claims.complete.is_set()
        return {"complete": complete, "stopped": not complete,
                "stats": workers.merged_stats(Stats()).as_dict(),
                "demanded": workers.demanded}
    finally:
        workers.publish_counters()


def describe_error(exc: BaseException) -> str:
    """A failure in one line (a LoaderError says it all itself)."""
    return str(exc) if isinstance(exc, LoaderError) else f"{type(exc).__name__}: {exc}"


def error_report(exc: BaseException) -> Report:
    """The report of work that failed with ``exc`` (call it in the ``except``)."""
    return {"error": describe_error(exc), "traceback": traceback.format_exc()}


def write_report(fd: int, report: Report) -> None:
    """Write ``report`` to pipe ``fd`` as one JSON line (the reader acts on the newline)."""
    data = json.dumps(report).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def read_report(fd: int) -> Report:
    """The one-line JSON report from pipe ``fd`` ({} if none came before EOF)."""
    received = b""
    while b"\n" not in received:
        data = os.read(fd, 65536)                # sleeps without the GIL
        if not data:
            break
        received += data
    if b"\n" not in received:
        return {}
    try:
        report = json.loads(received.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


# ---------------------------------------------------------------- a forked child
class ForkedChild:
    """A child process that runs ``body()`` and reports its outcome on a pipe.

    ``body`` returns the report; what it raises becomes an error report and
    exit status 1.  The child uses only what existed before the fork and
    threads it starts itself; idle pooled threads are ended first (a fork of
    a multi-threaded process is a deadlock risk CPython warns of).
    """

    def __init__(self, body: Callable[[], Report]) -> None:
        check_fork_allowed()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        release_thread_pool()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child_main(body, write_fd, parent)
        os.close(write_fd)
        #: the child's pid until it is reaped, then 0
        self.pid = pid
        self._report_fd = read_fd

    def read_report(self) -> Report:
        """Wait for the child's report ({} if it ended without one: it died)."""
        return read_report(self._report_fd)

    def wait(self) -> int:
        """Reap the child (it has ended, or is about to); its wait status."""
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return status

    def wait_for(self, timeout: float) -> Optional[int]:
        """Reap the child if it ends within ``timeout`` seconds; its wait status, else None."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the child if it is still ours (not reaped)."""
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Close the report pipe (idempotent)."""
        if self._report_fd >= 0:
            os.close(self._report_fd)
            self._report_fd = -1


def _child_main(body: Callable[[], Report], report_fd: int, parent: int) -> None:
    """The child's side: run ``body``, report, leave with ``os._exit``."""
    code = 0
    report: Report
    try:
        ioctl.libc.prctl(ioctl.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:                 # the parent died before the prctl
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        report = body()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        code = 1
        report = error_report(exc)
    try:
        write_report(report_fd, report)
    finally:
        os._exit(code)


# ------------------------------------------------------------- subinterpreters
_pool_lock = threading.Lock()
_idle: List[int] = []
_running: set = set()
#: run at exit before the idle interpreters are destroyed (``before_exit``)
_exit_first: List[Callable[[], None]] = []
_hooks_installed = False


def before_exit(fn: Callable[[], None]) -> None:
    """Have ``fn`` run at exit, before the idle interpreters are destroyed.

    For what must end first: a loader whose server still runs in an
    interpreter keeps it from being destroyed (CPython will not finalize a
    subinterpreter a thread still runs).
    """
    _exit_first.append(fn)


def _install_hooks() -> None:
    """Once, when the first interpreter is made: at exit and before every fork,
    destroy the idle ones (importing uffdpy registers nothing)."""
    global _hooks_installed
    with _pool_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=destroy_idle_interpreters)


def _at_exit() -> None:
    for fn in _exit_first:
        fn()
    destroy_idle_interpreters()


def interpreters_module() -> Any:
    """CPython's ``_interpreters``.

    Raises:
        LoaderError: this Python is older than 3.13.
    """
    try:
        import _interpreters  # type: ignore[import-not-found]  # CPython >= 3.13
    except ImportError:
        raise LoaderError(
            f"server='interpreter' needs Python 3.13 or newer (a subinterpreter with its "
            f"own GIL in which ctypes loads); this is Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: use the process server "
            f"(server='process', --server process) for plain Python access during the "
            f"load") from None
    return _interpreters


def _describe_failure(excinfo: Any) -> str:
    """One line from the exception snapshot that ``_interpreters.exec`` returns."""
    formatted = getattr(excinfo, "formatted", None) or getattr(excinfo, "msg", None)
    return str(formatted or excinfo)


class Interpreter:
    """An own-GIL subinterpreter with uffdpy imported, from the pool or new.

    :meth:`take` one, :meth:`run` work in it (any number of times, one at a
    time), then :meth:`give_back` it, or :meth:`destroy` it when the work
    failed or may have left a thread behind.
    """

    def __init__(self, ident: int) -> None:
        self.ident = ident

    @classmethod
    def take(cls) -> "Interpreter":
        """An idle interpreter from the pool, or a new one (~150 ms).

        Raises:
            LoaderError: Python is older than 3.13, or the interpreter failed to start.
        """
        with _pool_lock:
            ident = _idle.pop() if _idle else None
        if ident is None:
            ident = _new_interpreter()
        with _pool_lock:
            _running.add(ident)
        return cls(ident)

    def run(self, target: str, shared: Dict[str, Any], paths: Sequence[str] = ()) -> Optional[str]:
        """Call ``target`` (``"module:function"``) with the keywords ``shared`` in here.

        Runs in the calling thread, which holds the subinterpreter's GIL (not
        ours) until it returns.  ``shared`` holds only what crosses between
        interpreters (numbers, strings, bytes, tuples of them); ``paths`` are
        put in front of the subinterpreter's ``sys.path`` first.  Returns the
        failure in one line, or None.
        """
        module, function = target.split(":")
        names = sorted(shared)
        code = (f"import sys\nsys.path[:0] = [p for p in uffdpy_paths if p not in sys.path]\n"
                f"import {module}\n"
                f"{module}.{function}({', '.join(f'{n}={n}' for n in names)})\n"
                f"del {', '.join(['uffdpy_paths', *names])}\n")
        try:
            excinfo = interpreters_module().exec(
                self.ident, code, shared={"uffdpy_paths": tuple(paths), **shared})
        except BaseException as exc:  # noqa: BLE001 - reported like a failure inside
            return f"{type(exc).__name__}: {exc}"
        return None if excinfo is None else _describe_failure(excinfo)

    def give_back(self) -> None:
        """Return it to the pool, idle, for the next one to :meth:`take`."""
        with _pool_lock:
            _running.discard(self.ident)
            _idle.append(self.ident)

    def destroy(self) -> None:
        """Destroy it (~10-20 ms)."""
        _destroy_interpreter(self.ident)


def _new_interpreter() -> int:
    interps = interpreters_module()
    _install_hooks()
    ident = interps.create(interps.new_config("isolated"))
    # uffdpy/loader/hosting.py -> the directory holding uffdpy/
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = tuple([package_parent] + [p for p in sys.path if p != package_parent])
    try:
        excinfo = interps.exec(ident, "import sys\nsys.path[:] = paths\n"
                               "import uffdpy.loader.server_interpreter\n"
                               "del paths\n", shared={"paths": paths})
    except BaseException:
        interps.destroy(ident)
        raise
    if excinfo is not None:
        interps.destroy(ident)
        raise LoaderError(f"could not start an interpreter server: "
                          f"{_describe_failure(excinfo)}")
    return ident


def _destroy_interpreter(ident: int) -> None:
    with _pool_lock:
        _running.discard(ident)
    try:
        interpreters_module().destroy(ident)
    except Exception:  # noqa: BLE001 - already gone, or still running: nothing to do
        pass


def destroy_idle_interpreters() -> None:
    """Destroy the pool's idle interpreters (before a fork, at exit, or when asked)."""
    with _pool_lock:
        idle = list(_idle)
        _idle.clear()
    for ident in idle:
        _destroy_interpreter(ident)


def prepare_interpreters(count: int) -> None:
    """Have at least ``count`` idle interpreters in the pool."""
    while True:
        with _pool_lock:
            if len(_idle) >= count:
                return
        ident = _new_interpreter()
        with _pool_lock:
            _idle.append(ident)


def check_fork_allowed() -> None:
    """Refuse a fork while a subinterpreter runs (CPython 3.13 aborts the child).

    Raises:
        LoaderError: how many are running, and what to do instead.
    """
    with _pool_lock:
        running = len(_running)
    if running:
        raise LoaderError(
            f"server='process' forks, and {running} interpreter server(s) are loading: "
            f"CPython aborts a child forked while a subinterpreter exists; wait for them "
            f"or close them first, or use server='interpreter' here too")

