"""``LazyLoader``: guest memory usable at once, filled behind the guest's back.

A load, in the order ``_setup`` follows: validate the arguments and the
server (``Server.check_available``) before anything is mapped; map
anonymous memory for every region (``base._LoaderBase``); register all of
it with one userfaultfd in MISSING mode; map the image file read-only;
build the regions (``placement.Region``) and the claim map
(``claims.ClaimMap``, shared when the server is not a thread of this
process); make the wake fd; hand all of it to the server
(``SERVER_KINDS[server]``) as one ``server.Job``, which starts the workers
(``workers.Workers``).  Then the loader reports itself ready.  The server
tells the loader how the workers ended with one ``server.Report``
(``_ended``), and the loader acts on it.  When the last page is placed,
every block is unregistered, the uffd and the file mapping are closed, and
the memory is ordinary anonymous memory; a failed load is fenced (below).

Shutdown order (``close()``, any time, mid-load included): stop the workers
(set the stop flag, write the wake fd, join them with a timeout; a process
server is told through the same eventfd and killed if it does not go),
unregister the blocks, close the uffd, unmap the file, unmap the blocks.
Closing the uffd (or unregistering) while a fault is pending makes the kernel
resolve it as an ordinary fault, i.e. with a zero page: silent corruption.  So
a loader closed before completion first replaces its memory with inaccessible
(``PROT_NONE``) memory.  And a *failed* load (a worker raised, or the server
process died) does so at once for every page nobody placed, then wakes those
pages with ``UFFDIO_WAKE``: a thread waiting for a page that can never be
served gets SIGSEGV now, instead of waiting forever or reading zeros, while
the pages that were placed stay readable for a post-mortem.
"""
from __future__ import annotations

import bisect
import dataclasses
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple, Type

from ..memory import HUGE_PAGE_SIZE, PAGE_SIZE
from ..uffd import RegisterMode, Userfaultfd
from ..sizes import round_up
from .base import SnapshotLike, _LoaderBase, _open_source
from .claims import ClaimMap
from .errors import LoaderError
from .hosting import before_exit
from .options import DEFAULT_CHUNK_BYTES, LoadOptions, WorkerOptions
from .placement import Region, fence, protect_none
from .server import STOP_TIMEOUT, Job, MappedFile, Report, Server
from .server_interpreter import InterpreterServer
from .server_process import ProcessServer
from .server_thread import ThreadServer
from .stats import Stats
from ..wake import WakeFd
from .workers import Workers
from ..pagesource import PathLike
from ..workingset import WorkingSet, load_for, snapshot_identity

__all__ = ["LazyLoader", "SERVERS", "SERVER_KINDS"]

#: The class that runs the workers for each ``LazyLoader(server=...)`` value.
SERVER_KINDS: Dict[str, Type[Server]] = {
    cls.name: cls for cls in (ThreadServer, ProcessServer, InterpreterServer)}
#: The ways to run the fault loop and the prefetcher (``LazyLoader(server=...)``).
SERVERS = tuple(SERVER_KINDS)


class LazyLoader(_LoaderBase):
    """Make every block of a mapped-ram snapshot usable now and load it behind the guest.

    Args:
        snapshot_or_path: a page source (a mapped-ram ``Snapshot``, an
            ``ElfImage``) or the path of either (the format is recognised).
        server: ``"thread"`` (workers in this process: touch guest memory only
            without the GIL), ``"process"`` (workers in a forked server
            process: any Python code may read guest memory), or
            ``"interpreter"`` (Python 3.13+: workers in a subinterpreter with
            its own GIL, in this process: any Python code may read guest
            memory, and busy-polling pays off).
        prefetch: fill every page in the background; without it only touched
            pages are placed and the load completes when all have been touched.
        prefetch_chunk_bytes: the most bytes the prefetcher places per ioctl.
        fault_around_pages: on a fault, also place up to this many following
            unclaimed pages of the same kind in the same ioctl.
        server_cpu: pin the fault loop to this CPU (``None``: leave it alone).
        busy_poll: spin on the uffd instead of sleeping in ``poll`` (lower
            fault latency across CPUs, one CPU burnt while loading: on 2
            CPUs the prefetcher then completes ~1.5x later, measured
            177-179 ms -> 236-283 ms on a 1 GiB guest).  Worth it with the
            process and interpreter servers when faults matter more than
            completion; with the thread server a spinning loop competes for
            the GIL with the threads it serves.
        prefetch_threads: prefetch threads; each takes every n-th chunk, and
            the kernel copies for them in parallel.  Default: 2 when this
            process may run on 2 or more CPUs (measured ~1.4x faster to
            complete than 1 on a 2-CPU machine), else 1.
        huge_pages: back guest memory with 2 MiB hugetlbfs pages (as QEMU's
            ``-mem-path /dev/hugepages``) and place whole huge pages: one
            fault brings 2 MiB.  Needs free pages in the hugetlb pool
            (``/proc/sys/vm/nr_hugepages``); the counts in ``stats``
            (``pages_by_fault``, ``total_pages``...) are then of 2 MiB pages.
        populate_source: a background worker maps the file's data pages into
            the file mapping ahead of the copies, so that a fault's copy does
            not first take a page fault on its source (measured here: data
            faults 25% faster across CPUs once it is done; no clear change
            to a prefetching load, whose copies map their sources anyway).
            It reads every data page of the file, even with ``prefetch=False``.
        record_ws: write the pages the load *demanded* (faults; not what the
            prefetcher placed on its own), in order of first demand with
            their times, to this working-set file when the loader closes
            (:mod:`uffdpy.workingset`; :meth:`recorded` gives it as an object).
            Record with ``prefetch=False`` to see the whole working set.
        working_set: a working-set file recorded for this image (or a
            ``WorkingSet`` already loaded, for a harness that restores again
            and again: reading the file costs ~3 ms per thousand pages): the
            prefetcher places its pages first, in recorded order, then
            everything else in file order (faults still go first).  Refused
            (WorkingSetError, before anything is mapped) if it was recorded
            for another image.

    Raises:
        MappedRamError: the snapshot is malformed; nothing was mapped or registered.
        LoaderError: ``server="interpreter"`` before Python 3.13, or
            ``server="process"`` while an interpreter server is loading
            (CPython cannot fork then); nothing was mapped or registered.
        UffdError: userfaultfd could not be set up (the message says how to fix it).
        OSError: ENOMEM with ``huge_pages`` when the hugetlb pool is too small
            (the message says how many pages to reserve).
        ValueError: a bad argument.
    """

    def __init__(self, snapshot_or_path: SnapshotLike, *, server: str = "thread",
                 prefetch: bool = True, prefetch_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 fault_around_pages: int = 0, server_cpu: Optional[int] = None,
                 busy_poll: bool = False, prefetch_threads: Optional[int] = None,
                 huge_pages: bool = False, populate_source: bool = False,
                 options: Optional[LoadOptions] = None,
                 record_ws: Optional[PathLike] = None,
                 working_set: "Optional[PathLike | WorkingSet]" = None) -> None:
        super().__init__()
        given = LoadOptions(server=server, prefetch=prefetch,
                            prefetch_chunk_bytes=prefetch_chunk_bytes,
                            fault_around_pages=fault_around_pages, server_cpu=server_cpu,
                            busy_poll=busy_poll, prefetch_threads=prefetch_threads,
                            huge_pages=huge_pages, populate_source=populate_source)
        if options is not None and given != LoadOptions():
            raise ValueError("give LazyLoader options= or the option keywords, not both")
        opts = (options or given).resolved()
        #: how this load runs (validated: a ``LoadOptions``)
        self.options = opts
        kind = SERVER_KINDS[opts.server]
        kind.check_available()                 # before anything is mapped
        t0 = time.perf_counter()
        #: runs the workers (the ``SERVER_KINDS`` entry for ``server``)
        self._server: Server = kind()
        self._huge_pages = opts.huge_pages
        self._uffd: Optional[Userfaultfd] = None
        self._file: Optional[MappedFile] = None
        self._wake: Optional[WakeFd] = None
        self._regions: List[Region] = []
        self._claims: Optional[ClaimMap] = None
        self._error: Optional[BaseException] = None
        self._error_reported = False
        self._failed = False
        self._done = threading.Event()
        self._registered = False
        self._t0 = t0
        self._record_path = record_ws
        self._replay: Optional[WorkingSet] = None
        #: the demanded (address, ns) pairs an out-of-process server reported
        self._demanded: Optional[List[Tuple[int, int]]] = None
        self._source, self._owns_source = _open_source(snapshot_or_path)
        self._closed = False
        try:
            if isinstance(working_set, WorkingSet):
                self._replay = working_set
                working_set.check(self.source)
            elif working_set is not None:           # a bad file: refused before any mapping
                self._replay = load_for(working_set, self.source)
            self._setup(opts.worker_options(), record_demand=record_ws is not None,
                        t0_ns=int(t0 * 1e9) if record_ws is not None else 0)
        except BaseException:
            self._record_path = None            # a loader that never ran records nothing
            self.close(_raise=False)
            raise
        stats = self._stats
        stats.time_to_ready_s = time.perf_counter() - t0
        # A server outside this interpreter starts at once and may have placed
        # every page before we got here (a small image, the interpreter's
        # start-up handshake): to the caller it completed when it was ready.
        complete = stats.time_to_complete_s
        if complete is not None and complete < stats.time_to_ready_s:
            stats.time_to_complete_s = stats.time_to_ready_s
        self._server.ready()

    # -- setup, in the order the package essay gives
    def _setup(self, options: WorkerOptions, *, record_demand: bool, t0_ns: int) -> None:
        source = self.source
        if self._huge_pages:
            self._map_huge_blocks()
        else:
            self._map_blocks(transparent_huge_pages=False)
        self._uffd = Userfaultfd()
        for name in self._order:
            m = self._mappings[name]
            self._uffd.register(m.address, m.length, mode=RegisterMode.MISSING)
        self._registered = True
        self._file = MappedFile(source.fileno(), round_up(source.file_size, PAGE_SIZE),
                                source.path)
        unit = HUGE_PAGE_SIZE if self._huge_pages else PAGE_SIZE
        regions = [Region(i, r, self._mappings[r.name].address, self._file.address, unit)
                   for i, r in enumerate(source.regions)]
        claims = ClaimMap([r.units for r in regions], shared=self._server.claims_shared)
        self._regions, self._claims = regions, claims
        working_set: Tuple[Tuple[int, int], ...] = ()
        if self._replay is not None:
            # (region index, 4 KiB page): the prefetcher makes runs of them
            # itself, after ready (nothing it needs later is waited for here)
            index = {r.name: r.index for r in regions}
            working_set = tuple((index[b], p) for b, p, _, _ in self._replay.pages
                                if b in index)
        self._wake = WakeFd()
        job = Job(uffd=self._uffd, memory=tuple(self._mappings[r.name] for r in source.regions),
                  regions=tuple(regions), claims=claims, wake=self._wake, file=self._file,
                  unit=unit, options=options, working_set=working_set,
                  record_demand=record_demand, t0_ns=t0_ns)
        if self._server.stop_before_exit:
            _close_at_exit.add(self)
        self._server.start(job, self._ended)

    @property
    def server_pid(self) -> int:
        """The server process's pid while it runs (``server="process"``), else 0."""
        return self._server.pid

    @property
    def workers(self) -> Optional[Workers]:
        """The fault loop and prefetcher (``workers.Workers``) when they run in this
        interpreter (``server="thread"``), else None: their regions, claim map and
        ``place``, for experiments and tests of the race between them."""
        return self._server.workers

    # -- endings
    def _ended(self, report: Report) -> None:
        """The workers have ended (``on_end``, in a thread of the server): act on the report."""
        try:
            stats = self._stats
            for field in dataclasses.fields(stats):    # what the workers did
                if field.name not in ("time_to_ready_s", "time_to_complete_s"):
                    setattr(stats, field.name, getattr(report.stats, field.name))
            if report.demanded is not None:            # record_ws: the faults, in order
                self._demanded = list(report.demanded)
            if report.error is not None:
                self._fail(report.error)
                self._fence_unplaced()
            elif report.complete:
                self._finish()
        finally:
            self._done.set()

    def _finish(self) -> None:
        """Every page is placed: unregister, close the uffd and the file mapping."""
        if self._stats.time_to_complete_s is None:
            self._stats.time_to_complete_s = time.perf_counter() - self._t0
        self._teardown_uffd()
        self._server.finished()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._failed = True

    def _fence_unplaced(self) -> None:
        """The load failed: make every page nobody placed inaccessible, then wake its waiters.

        Runs once the workers have ended.  Each unplaced run is replaced by
        ``PROT_NONE`` memory and woken with ``UFFDIO_WAKE``: a thread that was
        waiting for it retries and gets SIGSEGV now, instead of waiting
        forever, and can never read zeros in place of data.  Placed pages stay
        readable.
        """
        claims, uffd = self._claims, self._uffd
        if claims is None or uffd is None or uffd.closed:
            return
        fence(self._regions, claims, uffd)

    def _teardown_uffd(self) -> None:
        uffd = self._uffd
        if uffd is not None and not uffd.closed:
            if self._registered:
                for m in self._mappings.values():
                    uffd.unregister(m.address, m.length)
                self._registered = False
            uffd.close()
        if self._file is not None:
            self._file.close()
        if self._wake is not None:
            self._wake.close()

    # -- public
    @property
    def server(self) -> str:
        """``"thread"``, ``"process"`` or ``"interpreter"``."""
        return self.options.server

    @property
    def finished(self) -> bool:
        """True once the load has ended, complete or not (``wait()`` then returns at once)."""
        return self._done.is_set()

    @property
    def file_mapping_address(self) -> int:
        """Where the read-only mapping of the image file (what the copies read from) is,
        or 0 when there is none (the load ended, or the process server has it)."""
        return 0 if self._file is None else self._file.address

    @property
    def complete(self) -> bool:
        """True once every page is placed and the uffd is closed."""
        return self._done.is_set() and not self._failed and self._stats.time_to_complete_s is not None

    def progress(self) -> Tuple[int, int]:
        """``(placed_pages, total_pages)`` right now."""
        claims = self._claims
        if claims is None:
            return (0, 0)
        if self._done.is_set() or self._closed:       # the workers' final figure
            return (self._stats.placed_pages, claims.total_pages)
        return (self._server.placed(), claims.total_pages)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until every page is placed and the uffd is closed.

        Returns:
            True when the load is complete, False when ``timeout`` (seconds) ran out.

        Raises:
            LoaderError: a worker failed (its exception is ``__cause__``).
            ServerDiedError: the server process died before completion.
        """
        if not self._done.wait(timeout):
            return False
        self._raise_error()
        return self.complete

    def _raise_error(self) -> None:
        exc = self._error
        if exc is None:
            return
        self._error_reported = True
        if isinstance(exc, LoaderError):
            raise exc
        raise LoaderError(f"loader stopped: {exc!r}") from exc


    @property
    def stats(self) -> Stats:
        """Load statistics so far (see ``Stats``)."""
        if not (self._done.is_set() or self._closed):
            self._server.stats_into(self._stats)      # once ended, the report's figures
        return self._stats

    def recorded(self) -> WorkingSet:
        """The pages demanded so far (with ``record_ws``), in order of first demand.

        Each is ``(region, 4 KiB page, seconds since the loader started, holds
        data)``; a huge-page load records the first 4 KiB page of each 2 MiB.
        """
        if self._record_path is None:
            raise ValueError("recorded() needs LazyLoader(..., record_ws=PATH)")
        raw = self._demanded
        if raw is None:                          # the thread server's, as they come
            live = self._server.demanded()
            raw = None if live is None else list(live)
        spans = sorted((self._mappings[name].address, self._mappings[name].length, region)
                       for name, region in zip(self._order, self.source.regions))
        starts = [a for a, _, _ in spans]
        seen = set()
        pages: List[Tuple[str, int, float, bool]] = []
        for address, t_ns in raw or ():
            i = bisect.bisect_right(starts, address) - 1
            if i < 0:
                continue
            start, length, region = spans[i]
            if address >= start + length:
                continue
            page = (address - start) // PAGE_SIZE
            key = (region.name, page)
            if key in seen or page >= region.pages:
                continue
            seen.add(key)
            pages.append((region.name, page, round(t_ns / 1e9, 6), region.is_present(page)))
        return WorkingSet(snapshot=snapshot_identity(self.source), pages=pages)

    def close(self, *, _raise: bool = True) -> None:
        """Stop loading, unregister and unmap everything (idempotent, safe mid-load).

        The shutdown order (the package essay has why):

        1. stop the server and wait for it; a server that will not stop
           may still use everything below, which is then left to it;
        2. fence: a load closed before completion puts ``PROT_NONE`` over
           its memory, so that unregistering cannot let a waiter fault in
           zeros;
        3. unregister the memory, close the uffd, the file mapping and the
           wake fd (``_teardown_uffd``);
        4. release what the server itself holds, and write the recording
           (``record_ws``);
        5. close the claim map;
        6. unmap the memory;
        7. close the source, if the loader opened it;
        8. raise a worker's error that ``wait()`` has not reported.

        Raises:
            LoaderError: a worker had failed and ``wait()`` has not reported it yet.
        """
        if self._closed:
            return
        self._closed = True
        stopped = self._server.stop()                          # 1
        _close_at_exit.discard(self)
        if not stopped:
            # Stuck: it may still use the uffd, the file mapping, the
            # claims and the memory.  Leak them rather than pull them away.
            self._fail(LoaderError(f"the {self._server.name} server did not stop within "
                                   f"{STOP_TIMEOUT:.0f} s"))
            if _raise:
                self._raise_error()
            return
        if self._registered:                                   # 2: closed before completion
            # Unregistering wakes the waiters, which would then fault in zero
            # pages: nothing may read a page that was never served as zeros.
            for m in self._mappings.values():
                protect_none(m.address, m.length)
            self._registered = False
        self._teardown_uffd()                                  # 3
        self._server.close()                                   # 4
        recording = None
        if self._record_path is not None:                      # 4b: the recording
            recording, path = self.recorded(), self._record_path
            self._record_path = None
        if self._claims is not None:                           # 5
            self._claims.close()
        self._unmap_blocks()                                   # 6
        if self._owns_source and self._source is not None:     # 7
            self._source.close()
        if recording is not None:                              # 4b, written now
            recording.save(path)
        if _raise and not self._error_reported:                # 8
            self._raise_error()



#: loaders whose server must be stopped before the interpreter exits
#: (``Server.stop_before_exit``), while it may run
_close_at_exit: "weakref.WeakSet[LazyLoader]" = weakref.WeakSet()


def _close_unclosed_loaders() -> None:
    """At exit: close every loader in ``_close_at_exit`` (one never closed).

    Without this the interpreter hangs at exit: CPython will not finalize a
    subinterpreter that a thread is still running.  Runs before the idle
    interpreters are destroyed (``hosting.before_exit``).
    """
    for loader in list(_close_at_exit):
        loader.close(_raise=False)


before_exit(_close_unclosed_loaders)
