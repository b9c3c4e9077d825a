"""Where the workers of a load run: the ``Server`` interface, and the GIL.

``LazyLoader`` does the same setup for every server (map, register, file
map, regions, claim map, wake fd), then hands the load to one ``Server``
chosen by name from ``lazy.SERVER_KINDS`` (as trio's ``_run`` picks an I/O
backend, or multiprocessing's ``context`` a ``Popen``): ``start`` runs the
workers, ``placed`` and ``stats_into`` tell the loader how far they got,
``finished`` runs once every page is placed, ``stop`` ends them (False: the
server is stuck, and the loader leaks what it may still use rather than pull
it away), ``close`` releases what the server itself holds.

Servers and the GIL
===================
``server="thread"`` (:mod:`.server_thread`) runs the fault loop and the
prefetcher as threads of this process.  A Python thread that touches
not-yet-loaded guest memory *while holding the GIL* (``bytes(mem[a:b])``,
``struct.unpack_from``, numpy) sleeps in the kernel with the GIL held; the
fault loop then can never run to serve it, and the whole interpreter
deadlocks.  With the thread server, touch guest memory only without the GIL:
``ctypes.memmove``/``ctypes.memset``, a KVM vCPU, or from another process.
``scripts/gil_deadlock.py`` shows the deadlock (under a timeout) and the cure.

``server="process"`` (:mod:`.server_process`) registers the memory here (a
uffd belongs to the address space that created it), then forks a server
process that inherits the uffd, the parsed snapshot and the file mapping and
runs both workers there.  Serving a fault then needs nothing from this
process, so any Python code here may read guest memory while it loads.  This
process keeps its own copy of the uffd until completion, so a dying server
never lets the kernel fill pending faults with zeros: its unplaced pages are
fenced, and ``wait()`` raises ``ServerDiedError`` naming the exit status.
The fork happens while the constructor holds the GIL; the child uses only
objects made before the fork and new threads, and leaves with ``os._exit``.
For the process server the claim map lives in ``MAP_SHARED`` memory, so this
process knows what a dead server had placed.

``server="interpreter"`` (:mod:`.server_interpreter`, Python 3.13 or newer)
runs both workers in a subinterpreter made with the "isolated" config, which
has its own GIL (PEP 684).  It shares this process's address space and fd
table, so nothing is forked or copied: it serves through a dup of this uffd,
from this process's file mapping, into these mappings, and claims pages in a
second view (another mmap of the same memfd) of the claim map.  A host thread
of this interpreter sits in ``_interpreters.exec`` for the whole load, which
switches it to the subinterpreter's GIL and leaves ours free, so any Python
code here may read guest memory while it loads, as with the process server;
and no GIL is shared between the fault loop and the threads it serves, so
the fault loop may busy-poll (measured with a minimal handler: 1.3-1.7x of a
C handler's fault latency in every placement, where a busy thread sharing the
GIL with a Python toucher is 2.3-2.7x; the README has the loader's own
figures).  Only numbers cross over (fds, addresses, the bitmaps as bytes);
the result comes back as a one-line JSON report on a pipe.  If the
subinterpreter fails, it fences the unplaced pages itself before reporting: a
thread of ours may be asleep on one of them while holding our GIL, so we
might never get to.

Two CPython facts shape it.  Python 3.12 has own-GIL subinterpreters but
its ``_ctypes`` refuses to load in one, so 3.13 is the first that works.
And CPython 3.13 aborts a child forked while any subinterpreter exists
("PyThreadState_Get: ... the GIL is released"): idle subinterpreters (they
are pooled, since making one and importing uffdpy in it takes ~150 ms; see
``prepare_interpreter_servers``) are destroyed before every ``os.fork()``,
and a process server is refused while an interpreter server is loading.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Dict

from .claims import ClaimMap
from .errors import LoaderError
from .stats import LIVE_FIELDS, Stats
from .workers import Workers

if TYPE_CHECKING:                      # for annotations only: lazy imports this module
    from .lazy import LazyLoader

__all__ = ["Server"]


class Server(abc.ABC):
    """Runs the workers of one ``LazyLoader``: threads here, a forked process, a subinterpreter.

    One instance per load, made before anything is mapped.  It works on its
    loader's mappings, uffd, claim map and wake fd, and ends the load through
    the loader's ``_finish``/``_fail``/``_fence_unplaced`` and its ``_done``.
    """

    #: the ``LazyLoader(server=...)`` value
    name: ClassVar[str]
    #: the claim map must be ``MAP_SHARED`` (another process or interpreter places pages)
    claims_shared: ClassVar[bool] = True
    #: the server process's pid while it runs, else 0
    pid = 0

    def __init__(self, loader: "LazyLoader") -> None:
        self.loader = loader

    @classmethod
    def check_available(cls) -> None:
        """Refuse a server this process cannot run, before anything is mapped.

        Raises:
            LoaderError: why not, and what to use instead.
        """

    @abc.abstractmethod
    def start(self, unit: int, options: Dict[str, Any]) -> None:
        """Start the workers (``options``: the ``Workers`` keywords); return once they run."""

    def placed(self, claims: ClaimMap) -> int:
        """Pages placed so far (the final report's figure once the load has ended)."""
        loader = self.loader
        if loader._done.is_set() or loader._closed:
            return loader._stats.placed_pages
        return claims.placed_count()

    def stats_into(self, stats: Stats) -> None:
        """Bring ``stats`` up to date with what the workers have done so far.

        A server outside this interpreter publishes its counters in the
        claim map's header while it loads (``LIVE_FIELDS``); once the load
        has ended, its final report has set them (and the latencies).
        """
        loader = self.loader
        if not (loader._done.is_set() or loader._closed):
            self._read_live(stats)

    def _read_live(self, stats: Stats) -> None:
        """Copy the counters the server published into ``stats`` (nothing once closed)."""
        claims = self.loader._claims
        if claims is None or claims.fd < 0:
            return
        for name, value in zip(LIVE_FIELDS, claims.published(len(LIVE_FIELDS))):
            setattr(stats, name, value)
        stats.total_pages = claims.total_pages
        stats.placed_pages = claims.placed_count()

    def finished(self) -> None:
        """Every page is placed and the uffd is closed (``LazyLoader._finish``)."""

    @abc.abstractmethod
    def stop(self) -> bool:
        """Stop the workers and wait for them; False when they are stuck (nothing may be freed)."""

    def close(self) -> None:
        """Release what the server itself holds (after the uffd is closed; idempotent)."""

    # -- helpers for the servers
    def _workers(self, options: Dict[str, Any]) -> Workers:
        """The workers over this loader's uffd, regions, claim map and wake fd."""
        loader = self.loader
        assert loader._uffd is not None and loader._claims is not None
        assert loader._wake is not None
        return Workers(loader._uffd, loader._regions, loader._claims, loader._wake,
                       file_fd=loader._file_fd, path=loader.source.path, **options)

    def _act_on_report(self, report: Dict[str, Any]) -> None:
        """Act on a server's final report (process or interpreter server)."""
        loader = self.loader
        if report.get("complete"):
            self._apply_child_stats(report)
            loader._finish()
        elif report.get("error"):
            self._read_live(loader._stats)         # what it did before it failed
            loader._fail(LoaderError(f"fault server failed: {report['error']}"))
            loader._fence_unplaced()
        elif report.get("stopped"):
            self._apply_child_stats(report)

    def _apply_child_stats(self, report: Dict[str, Any]) -> None:
        demanded = report.get("demanded")
        if isinstance(demanded, list):            # record_ws: the faults, in order
            self.loader._demanded = [(int(a), int(t)) for a, t in demanded]
        for key, value in report.get("stats", {}).items():
            if key not in ("time_to_ready_s", "time_to_complete_s"):
                setattr(self.loader._stats, key, value)
