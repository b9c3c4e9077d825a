"""Where the workers of a load run: the ``Server`` interface, and the GIL.

``LazyLoader`` does the same setup for every server (map, register, file
map, regions, claim map, wake fd), then hands the load to one ``Server``
chosen by name from ``lazy.SERVER_KINDS`` (as trio's ``_run`` picks an I/O
backend, or multiprocessing's ``context`` a ``Popen``).  The server knows
nothing of the loader: it gets a ``Job``, a frozen value holding what the
workers need (the uffd, the regions, the claim map, the wake fd, the image
file, the ``WorkerOptions``...), and a callback, ``on_end``, to which it hands
one ``Report`` when the workers have ended (complete, stopped or failed).
What a report means for the load (finish, or fail and fence) is the
loader's business.  Meanwhile ``placed`` and ``stats_into`` tell the loader
how far the workers got, ``ready`` lets them go on once the loader is ready,
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
import dataclasses
import os
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from ..memory import Mapping
from ..uffd import Userfaultfd
from .claims import ClaimMap
from .errors import LoaderError
from .options import WorkerOptions
from .placement import Region
from .stats import LIVE_FIELDS, Stats
from ..wake import WakeFd
from .workers import Workers

__all__ = ["Job", "MappedFile", "Report", "Server", "STOP_TIMEOUT"]

#: Seconds a server's workers get to stop before the server counts as stuck.
STOP_TIMEOUT = 30.0


class MappedFile:
    """The image file as the workers read it: a dup of its fd, and a read-only mapping.

    The copies read from the mapping; the bounce buffers are filled from
    the fd with ``preadv``.  The dup means the load reads the file that was
    validated even if another now has its name (a writer that renames over
    it, as uffdpy's own do).  The loader makes it and closes it when the
    load ends; a server may close it sooner (the process server's parent,
    whose child has its own copy).  ``close`` is idempotent.
    """

    def __init__(self, source_fd: int, length: int, path: str) -> None:
        #: the image's path, for error messages
        self.path = path
        #: the dup of the source's fd (-1 once closed)
        self.fd = os.dup(source_fd)
        try:
            self.mapping: Mapping = Mapping.of_file(self.fd, length)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @property
    def address(self) -> int:
        """Where the mapping is, or 0 once it is closed."""
        return 0 if self.mapping.closed else self.mapping.address

    def close(self) -> None:
        """Unmap the file and close the fd (idempotent)."""
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(frozen=True)
class Job:
    """What a server needs to run the workers of one load, made by the loader.

    The objects in it (uffd, claim map, wake fd, mappings) stay the loader's:
    the server uses them and closes none of them, except ``file`` early.
    """

    uffd: Userfaultfd
    #: the registered guest memory, one mapping per region, in region order
    memory: Tuple[Mapping, ...]
    regions: Tuple[Region, ...]
    claims: ClaimMap
    wake: WakeFd
    file: MappedFile
    #: bytes per unit of placement (4 KiB, or 2 MiB with huge pages)
    unit: int
    options: WorkerOptions
    #: ``(region index, 4 KiB page)`` pages to prefetch first, in this order
    working_set: Tuple[Tuple[int, int], ...] = ()
    #: keep every fault's address and time (``LazyLoader(record_ws=...)``)
    record_demand: bool = False
    #: the clock (``perf_counter`` ns) the recorded times count from
    t0_ns: int = 0

    def workers(self, *, daemon_threads: bool = True) -> Workers:
        """The workers of this job (not started)."""
        return Workers(self.uffd, list(self.regions), self.claims, self.wake, self.options,
                       daemon_threads=daemon_threads, file_fd=self.file.fd,
                       path=self.file.path, working_set=self.working_set,
                       record_demand=self.record_demand, t0_ns=self.t0_ns)


@dataclasses.dataclass(frozen=True)
class Report:
    """How the workers of a load ended: what a server hands to ``on_end``, once."""

    #: every page is placed
    complete: bool
    #: the workers' counters at the end (what a failed server had published)
    stats: Stats
    #: what failed (the load failed), or None (complete, or stopped when asked)
    error: Optional[BaseException] = None
    #: with ``Job.record_demand``: the ``(fault address, ns)`` pairs, in order
    demanded: Optional[Sequence[Tuple[int, int]]] = None

    @classmethod
    def of_workers(cls, workers: Workers) -> "Report":
        """The report of workers that ran in this interpreter and have ended."""
        return cls(complete=workers.error is None and workers.claims.complete.is_set(),
                   stats=workers.merged_stats(Stats()), error=workers.error,
                   demanded=workers.demanded)

    @classmethod
    def from_line(cls, data: Dict[str, Any], claims: ClaimMap) -> "Report":
        """The report of workers elsewhere, from their one-line JSON (``hosting.write_report``).

        A failure becomes a ``LoaderError`` naming it, with the counters the
        server published in ``claims`` before it failed.
        """
        if data.get("error"):
            return cls(complete=False, stats=live_stats(claims),
                       error=LoaderError(f"fault server failed: {data['error']}"))
        fields = {f.name for f in dataclasses.fields(Stats)}
        given = data.get("stats", {})
        stats = Stats(**{k: v for k, v in given.items() if k in fields})
        demanded = data.get("demanded")
        return cls(complete=bool(data.get("complete")), stats=stats,
                   demanded=([(int(a), int(t)) for a, t in demanded]
                             if isinstance(demanded, list) else None))


def live_stats(claims: ClaimMap) -> Stats:
    """The counters a server outside this interpreter published in ``claims`` so far.

    Only ``stats.LIVE_FIELDS``, ``total_pages`` and ``placed_pages`` are
    set; nothing once the claim map is closed.
    """
    stats = Stats()
    if claims.fd < 0:
        return stats
    for name, value in zip(LIVE_FIELDS, claims.published(len(LIVE_FIELDS))):
        setattr(stats, name, value)
    stats.total_pages = claims.total_pages
    stats.placed_pages = claims.placed_count()
    return stats


class Server(abc.ABC):
    """Runs the workers of one load: threads here, a forked process, a subinterpreter.

    One instance per load, made before anything is mapped, started once with
    a ``Job``.  It hands one ``Report`` to ``on_end`` when the workers have
    ended on their own (complete or failed) or were stopped, from a thread
    of its own (never from ``start``).  When ``start`` raises, a report may
    have come or may never come: nothing should wait for one.
    """

    #: the ``LazyLoader(server=...)`` value
    name: ClassVar[str]
    #: the claim map must be ``MAP_SHARED`` (another process or interpreter places pages)
    claims_shared: ClassVar[bool] = True
    #: the server must be stopped before the interpreter exits (CPython will
    #: not finalize a subinterpreter that a thread still runs)
    stop_before_exit: ClassVar[bool] = False
    #: the server process's pid while it runs, else 0
    pid = 0
    #: the workers, when they run in this interpreter (the thread server), else None
    workers: Optional[Workers] = None

    def __init__(self) -> None:
        self.job: Optional[Job] = None

    @classmethod
    def check_available(cls) -> None:
        """Refuse a server this process cannot run, before anything is mapped.

        Raises:
            LoaderError: why not, and what to use instead.
        """

    @abc.abstractmethod
    def start(self, job: Job, on_end: Callable[[Report], None]) -> None:
        """Start the workers of ``job``; return once they run.

        Raises:
            LoaderError: they could not start (nothing is left running).
        """

    def ready(self) -> None:
        """The loader is ready: the workers may go on with their background work."""

    def placed(self) -> int:
        """Pages placed so far, while the workers run (the shared claim map's count)."""
        assert self.job is not None
        return self.job.claims.placed_count()

    def stats_into(self, stats: Stats) -> None:
        """Bring ``stats`` up to date with what the running workers have done so far.

        A server outside this interpreter publishes its counters in the
        claim map's header while it loads (``LIVE_FIELDS``).
        """
        if self.job is None or self.job.claims.fd < 0:
            return
        live = live_stats(self.job.claims)
        for name in (*LIVE_FIELDS, "total_pages", "placed_pages"):
            setattr(stats, name, getattr(live, name))

    def demanded(self) -> Optional[List[Tuple[int, int]]]:
        """The faults recorded so far, where this interpreter can see them as they
        come (the thread server), else None: the report brings them."""
        return None

    def finished(self) -> None:
        """Every page is placed and the uffd is closed: release what is no longer needed."""

    @abc.abstractmethod
    def stop(self) -> bool:
        """Stop the workers and wait for them; False when they are stuck (nothing may be freed)."""

    def close(self) -> None:
        """Release what the server itself holds (after the uffd is closed; idempotent)."""
