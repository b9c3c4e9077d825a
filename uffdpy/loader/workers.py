"""The workers: the fault loop, the prefetcher and the source populator over one uffd.

``LazyLoader`` maps anonymous memory for every region, registers all of it
with one userfaultfd in MISSING mode and only then reports itself ready.
From that moment any access to a page that is not yet there traps into the
kernel, which queues a fault message on the uffd and puts the accessing
thread to sleep.  Two workers then race to fill memory:

* the **fault loop** polls the uffd and a wake fd, reads fault messages in
  batches, and places each faulting page with one ``UFFDIO_COPY`` straight
  from a read-only mmap of the snapshot file (or ``UFFDIO_ZEROPAGE`` when the
  block's bitmap says the page is zero).  The ioctl installs the whole page
  atomically and wakes the sleeping thread: nobody ever sees half a page.
* the **prefetcher** walks every block in file order by runs of present and
  zero pages and places them in large chunks (2 MiB by default), one ioctl per
  chunk, with no per-page Python loop.

Both go through the **claim map** (:mod:`.claims`): one byte per page,
``UNCLAIMED`` -> ``CLAIMED`` -> ``PLACED``, with the claim taken under a lock
(for the common fault, one unclaimed 4 KiB page, claim, ioctl and mark
happen in one hold of it).  Whoever claims a page places it; the other side
leaves it alone.  One exception keeps a fault from waiting for a whole
prefetch chunk: when the fault loop reads a fault for a page the prefetcher
has claimed but not yet placed (its 2 MiB copy may be in flight), it copies
that one page itself.  The kernel installs a page once: whichever copy comes
second gets ``EEXIST`` for it, wakes it and skips it, and the installer alone
marks it placed.  Prefetch threads also run at a lower scheduling priority
(nice +10) than the fault loop, so a fault is served before the next chunk
when CPUs are short.  A fault for a page already ``PLACED`` is a message that
was read after the page arrived, or a page that was dropped again: the loop
issues the placement once more and the kernel answers ``EEXIST`` ("already
there", counted in ``eexist``, and the range is woken) or, if the page really
was dropped, installs it again (counted in ``double_placements``: a healthy
load shows zero).

``Workers`` (the name is historical: it is the workers, whichever server
runs them) is the same object in every server: threads of this process, of
a forked server process, or of a subinterpreter (:mod:`.server`).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import os
import select
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .. import ioctl
from ..memory import PAGE_SIZE, Mapping
from ..uffd import Filler, UffdError, Userfaultfd
from ..sizes import MiB
from ..latency import percentiles
from .claims import CLAIMED, PLACED, ClaimMap
from .errors import LoaderError
from .options import WorkerOptions
from .placement import DIRECT, Placer, Region
from .stats import Stats, WorkerCounters
from .threads import release_thread_pool, run_pooled, start_thread
from ..wake import WakeFd

#: Prefetch threads run this much nicer than the fault loop (and the guest's
#: threads): when CPUs are short, a fault is served before the next chunk.
PREFETCH_NICE = 10
#: Bytes of the file mapping the source populator maps per ``madvise`` call.
POPULATE_BYTES = 2 * MiB
#: Fault messages read per ``read`` call.
MSG_BATCH = 64
#: struct uffd_msg, from the ABI structs: its size, and which u64 word holds
#: a pagefault message's address (arg.pagefault.address)
_MSG_SIZE = ctypes.sizeof(ioctl.uffd_msg)
_ADDRESS_WORD = (ioctl.uffd_msg.arg.offset + ioctl.uffd_msg_arg.pagefault.offset
                 + ioctl.uffd_msg_pagefault.address.offset) // 8
_WORDS_PER_MSG = _MSG_SIZE // 8


class Workers(Placer):
    """The fault loop and the prefetcher over one uffd; runs in-process or in the child."""

    def __init__(self, uffd: Userfaultfd, regions: List[Region], claims: ClaimMap,
                 wake: "WakeFd", options: WorkerOptions, *, daemon_threads: bool = True,
                 file_fd: int = -1, path: str = "",
                 working_set: Sequence[Sequence[int]] = (), record_demand: bool = False,
                 t0_ns: int = 0) -> None:
        self.uffd = uffd
        #: how they work (prefetch or not, chunk size, fault-around...): never changed
        self.options = options
        prefetch, chunk_bytes = options.prefetch, options.chunk_bytes
        fault_around_pages, prefetch_threads = options.fault_around_pages, options.prefetch_threads
        #: ``[region index, 4 KiB page]`` pages the prefetcher places first,
        #: in this order (a replayed working set), before the rest
        self.working_set = working_set
        self._ws_runs: Optional[List[Tuple[int, int, int]]] = None
        self._ws_lock = threading.Lock()
        #: with ``record_demand``: ``(fault address, ns since t0_ns)`` of every
        #: fault read, in order (``LazyLoader.recorded`` keeps each page's first)
        self.demanded: Optional[List[Tuple[int, int]]] = [] if record_demand else None
        self.t0_ns = t0_ns
        #: the image file, read into the bounce buffers with preadv (never
        #: through the mapping: see ``Region.fill_bounce``); the caller's fd
        self.file_fd = file_fd
        self.path = path
        # an isolated subinterpreter may not start daemon threads
        self.daemon_threads = daemon_threads
        self.regions = regions
        # mmap hands out addresses top-down: bisect needs them sorted
        self.by_address = sorted(regions, key=lambda r: r.start)
        self.starts = [r.start for r in self.by_address]
        self._last_region: Optional[Region] = self.by_address[0] if regions else None
        self.claims = claims
        #: wakes the fault loop out of ``poll`` (``stop``); the loader owns and closes it
        self.wake = wake
        self.prefetch_enabled = prefetch
        self.chunk_bytes = chunk_bytes
        self.fault_around_pages = fault_around_pages
        self.server_cpu = options.server_cpu
        self.busy_poll = options.busy_poll
        self.prefetch_threads = prefetch_threads
        self.populate_source = options.populate_source
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.fault_counters = WorkerCounters()
        self.prefetch_counters = [WorkerCounters() for _ in range(prefetch_threads)]
        # One bounce buffer per worker, only when some region needs one.
        self.fault_bounce: Optional[Mapping] = None
        self.prefetch_bounce: List[Optional[Mapping]] = [None] * prefetch_threads
        unit = max((r.unit for r in regions), default=PAGE_SIZE)
        fault_bytes = (fault_around_pages + 1) * unit
        chunk = max(chunk_bytes // unit, 1) * unit
        if any(r.needs_bounce for r in regions):
            self.fault_bounce = Mapping.anonymous(fault_bytes)
            if prefetch:
                self.prefetch_bounce = [Mapping.anonymous(chunk) for _ in range(prefetch_threads)]
        #: hugetlbfs has no UFFDIO_ZEROPAGE: zero huge pages are copied from
        #: here, memory that is never written (reads map the shared zero page)
        self.zero_source: Optional[Mapping] = None
        if unit != PAGE_SIZE:
            self.zero_source = Mapping.anonymous(max(fault_bytes, chunk))
        #: the fault loop first, then the others (Threads, or pooled ``Task``s)
        self.threads: List[Any] = []
        #: every worker thread started (``start`` returned)
        self.running = False
        self.ended = threading.Event()
        #: set once the loader has reported ready: the prefetcher waits for it,
        #: so that it does not compete for the GIL with the setup it follows
        self.go = threading.Event()
        self._on_end: Optional[Callable[[], None]] = None

    # -- lifecycle
    def start(self, on_end: Optional[Callable[[], None]] = None) -> None:
        """Start the workers; ``on_end`` runs in the fault-loop thread once both have ended."""
        self.claims.set_on_complete(self._wake)
        self._on_end = on_end
        # (name, function); the fault loop last: it joins the others when it ends
        work: List[Tuple[str, Callable[[], None]]] = []
        if self.populate_source:
            work.append(("uffdpy-populate", functools.partial(self._run, self.populate)))
        if self.prefetch_enabled:
            for k in range(self.prefetch_threads):
                work.append((f"uffdpy-prefetch-{k}",
                             functools.partial(self._run, functools.partial(self.prefetch, k))))
        work.append(("uffdpy-fault-loop", self._fault_thread))
        started: List[Any] = []
        try:
            for name, fn in work:
                if name == "uffdpy-fault-loop":
                    self.threads = [None, *started]        # what the loop will join
                if self.daemon_threads:
                    started.append(run_pooled(name, fn))   # an idle thread, if there is one
                else:                                      # a subinterpreter: no daemons
                    t = threading.Thread(target=fn, name=name, daemon=False)
                    start_thread(t)
                    started.append(t)
        except BaseException:
            # Nothing runs the fault loop: stop the threads that did start
            # (they wait for ``go``, then see ``stopping``) and end here; the
            # system is short of threads, so the idle ones go too.
            self.stop()
            for t in started:
                t.join(30.0)
            self.threads = [t for t in started if t.is_alive()]
            release_thread_pool()
            self.ended.set()
            raise
        self.threads[0] = started[-1]                       # the fault loop first
        self.running = True

    def _fault_thread(self) -> None:
        self._run(self.fault_loop)
        self.stopping = True                  # the prefetcher stops at its next chunk
        for t in self.threads[1:]:
            t.join()
        self.ended.set()
        if self._on_end is not None:
            self._on_end()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised from wait()/close()
            if self.error is None:
                self.error = exc
            self.stop()

    def _wake(self) -> None:
        self.wake.signal()

    def stop(self) -> None:
        """Ask both workers to stop (from any thread)."""
        self.stopping = True
        self.go.set()
        self._wake()

    def close_buffers(self) -> None:
        """Unmap the bounce buffers (once the workers are done with them)."""
        for m in [self.fault_bounce, self.zero_source, *self.prefetch_bounce]:
            if m is not None:
                m.close()

    def join(self, timeout: float) -> bool:
        """Wait until both workers have ended; True when they have."""
        return self.ended.wait(timeout) if self.threads else True

    def merged_stats(self, stats: Stats) -> Stats:
        f, ps = self.fault_counters, self.prefetch_counters
        stats.faults = f.faults
        stats.fault_service_us = percentiles(f.service_ns, unit=1e-3)
        stats.pages_by_fault = f.pages
        stats.pages_by_prefetch = sum(p.pages for p in ps)
        stats.pages_by_working_set = sum(p.working_set for p in ps)
        stats.zero_pages = f.zero_pages + sum(p.zero_pages for p in ps)
        stats.bytes_copied = f.bytes_copied + sum(p.bytes_copied for p in ps)
        stats.eexist = f.eexist + sum(p.eexist for p in ps)
        stats.eagain = f.eagain + sum(p.eagain for p in ps)
        stats.double_placements = self.claims.double_placements
        stats.total_pages = self.claims.total_pages
        stats.placed_pages = self.claims.placed_pages
        return stats


    # -- live counters, for the servers outside the loader's interpreter
    def live_counters(self) -> Tuple[int, ...]:
        """The ``stats.LIVE_FIELDS`` counters so far, cheaply (no latency summary)."""
        f, ps = self.fault_counters, self.prefetch_counters
        return (f.faults, f.pages, sum(p.pages for p in ps),
                f.zero_pages + sum(p.zero_pages for p in ps),
                f.bytes_copied + sum(p.bytes_copied for p in ps),
                f.eexist + sum(p.eexist for p in ps), f.eagain + sum(p.eagain for p in ps),
                self.claims.double_placements, self.claims.placed_pages,
                sum(p.working_set for p in ps))

    def publish_counters(self) -> None:
        """Publish ``live_counters`` in the claim map's header, for the loader to read."""
        self.claims.publish(self.live_counters())

    # -- the fault loop
    def fault_loop(self) -> None:
        """Serve faults until every page is placed or ``stop()`` is called."""
        if self.server_cpu is not None:
            os.sched_setaffinity(threading.get_native_id(), {self.server_cpu})
        ufd = self.uffd.fileno()
        poller = select.poll()
        poller.register(ufd, select.POLLIN)
        poller.register(self.wake.fd, select.POLLIN)
        poll = poller.poll
        filler = Filler(self.uffd, max_messages=MSG_BATCH)   # this thread's own structs
        read, buf, words = filler.read, filler.buffer, filler.words
        counters = self.fault_counters
        service_ns = counters.service_ns
        clock = time.perf_counter_ns
        serve = self._serve
        complete = self.claims.complete
        deferred: List[int] = []
        pagefault = ioctl.UFFD_EVENT_PAGEFAULT
        busy = self.busy_poll
        demanded, t0_ns = self.demanded, self.t0_ns
        while True:
            ready = poll(0 if (busy or deferred) else None)
            if complete.is_set() or self.stopping:
                break
            if not ready:
                if not deferred:
                    continue                  # busy-polling: nothing yet (no read to fail)
            elif len(ready) > 1 or ready[0][0] != ufd:
                self.stopping = True          # the wake fd: a stop request
                break
            n = read()
            t_read = clock()
            addresses = deferred
            deferred = []
            for k in range(n):
                event = buf[k * _MSG_SIZE]
                if event != pagefault:
                    # only pagefaults were asked for (no non-cooperative
                    # features): anything else is a kernel surprise, not to
                    # be dropped in silence
                    raise LoaderError(f"unexpected userfaultfd event {event:#x} (only "
                                      f"pagefaults were registered for)")
                address = words[k * _WORDS_PER_MSG + _ADDRESS_WORD]
                addresses.append(address)
                if demanded is not None:
                    demanded.append((address, t_read - t0_ns))
            counters.faults += n                  # a retried fault was counted once already
            for address in addresses:
                if not serve(address, counters, filler):
                    deferred.append(address)
                service_ns.append(clock() - t_read)

    def _region_of(self, address: int) -> Region:
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0 or address >= self.by_address[i].end:
            raise LoaderError(f"fault at 0x{address:x} outside every registered block")
        region = self._last_region = self.by_address[i]
        return region

    def _serve(self, address: int, counters: WorkerCounters, filler: Filler) -> bool:
        """Resolve one fault; False when it must be retried after events are read."""
        region = self._last_region                # faults cluster: try the last one first
        if region is None or not region.start <= address < region.end:
            region = self._region_of(address)
        claims = self.claims
        start = region.start
        page = (address - start) // region.unit
        if region.one_page_fast and not self.fault_around_pages:
            # The common case, one unclaimed 4 KiB page from the file or one
            # zero page: claimed, placed and marked in one hold of the claim
            # lock (ClaimMap.place_one), then counted here.
            offset = page << 12
            if not region.bitmap[page >> 3] >> (page & 7) & 1:
                done = claims.place_one(region.index, page, filler.zeropage, start + offset,
                                        PAGE_SIZE)
                if done == PAGE_SIZE:
                    counters.pages += 1
                    counters.zero_pages += 1
                    return True
            elif page < region.direct_pages:
                try:
                    done = claims.place_one(region.index, page, filler.copy, start + offset,
                                            region.src + offset, PAGE_SIZE)
                except UffdError as exc:
                    raise self._copy_failed(region, page, DIRECT, exc) from exc
                if done == PAGE_SIZE:
                    counters.pages += 1
                    counters.bytes_copied += PAGE_SIZE
                    return True
        # Everything else goes through the claim map's claim and place: a page
        # another worker has in flight, one already placed, fault-around, huge
        # pages, bounce buffers, a copy that did not place the whole page.
        old = claims.claim(region.index, page)
        kind = region.kind(page)
        if old == CLAIMED:
            # In a prefetch chunk still in flight: place this one page now
            # instead of waiting for the whole chunk.  The kernel installs it
            # once; whichever copy comes second gets EEXIST and skips it.
            placed = self.place(region, page, page + 1, kind, counters, self.fault_bounce,
                                 filler)
            counters.pages += placed or 0
            return placed is not None
        bounce = self.fault_bounce
        if old == PLACED:
            # Read after the page arrived (the kernel answers EEXIST and we
            # wake), or the page was dropped since: then this places it again.
            placed = self.place(region, page, page + 1, kind, counters, bounce, filler)
            counters.pages += placed or 0
            return placed is not None
        end = page + 1
        if self.fault_around_pages:
            end = claims.claim_following(region.index, page, self.fault_around_pages)
            for j in range(page + 1, end):    # one kind of page per ioctl
                if region.kind(j) != kind:
                    claims.release(region.index, j, end)
                    end = j
                    break
        placed = self.place(region, page, end, kind, counters, bounce, filler)
        if placed is None:
            claims.release(region.index, page, end)
            return False
        counters.pages += placed
        return True

    # -- the source populator
    def populate(self) -> None:
        """Map the file pages that hold data into the file mapping, ahead of the copies.

        A ``UFFDIO_COPY`` whose source page is not yet mapped takes a page
        fault inside the kernel's copy first (measured here: ~8 µs more per
        single-page fault).  ``MADV_POPULATE_READ`` maps a whole range at
        ~0.4 µs a page, so this worker walks the present runs in file order,
        niced like the prefetcher, skipping ranges whose pages are all claimed
        already.  Best effort: it stops at the first error (a kernel before
        5.14 has no ``MADV_POPULATE_READ``; a truncated file, which the
        copies will report).
        """
        self.go.wait()
        _lower_priority(PREFETCH_NICE)
        claims = self.claims
        madvise = ioctl.libc.madvise
        for region in self.regions:
            step = max(1, POPULATE_BYTES // region.unit)
            for first, count, kind in region.runs():
                if kind != DIRECT:
                    continue
                for lo in range(first, first + count, step):
                    if self.stopping:
                        return
                    hi = min(lo + step, first + count)
                    if not claims.any_unclaimed(region.index, lo, hi):
                        continue
                    try:
                        madvise(region.src + lo * region.unit, (hi - lo) * region.unit,
                                ioctl.MADV_POPULATE_READ)
                    except OSError:
                        return

    # -- the prefetcher
    def prefetch(self, lane: int = 0) -> None:
        """Place every unclaimed page, block by block, in chunks of ``chunk_bytes``.

        With several prefetch threads, thread ``lane`` takes every
        ``prefetch_threads``-th chunk: the kernel copies in parallel while the
        threads wait in the ioctl without the GIL.
        """
        self.go.wait()
        counters = self.prefetch_counters[lane]
        bounce = self.prefetch_bounce[lane]
        uffd = self.uffd
        lanes = self.prefetch_threads
        # a replayed working set first, in recorded order, split among the lanes
        for n, (index, lo, hi) in enumerate(self._working_set_runs()):
            if n % lanes != lane:
                continue
            if self.stopping:
                return
            region = self.regions[index]
            before = counters.pages
            if not self._place_all(region, lo, hi, region.kind(lo), counters, bounce, uffd):
                return
            counters.working_set += counters.pages - before
        # the rest is background: a fault, or the guest's own work, goes first
        # (a working set's pages are the ones about to be faulted: not nicer)
        _lower_priority(PREFETCH_NICE)
        n = 0
        for region in self.regions:
            chunk = max(1, self.chunk_bytes // region.unit)
            for first, count, kind in region.runs():
                end_run = first + count
                for lo in range(first, end_run, chunk):
                    n += 1
                    if n % lanes != lane:
                        continue
                    if self.stopping:
                        return
                    hi = min(lo + chunk, end_run)
                    if not self._place_all(region, lo, hi, kind, counters, bounce, uffd):
                        return

    def _working_set_runs(self) -> List[Tuple[int, int, int]]:
        """The working set as runs, made once by whichever prefetch lane asks first."""
        with self._ws_lock:
            if self._ws_runs is None:
                self._ws_runs = _runs_of(self.working_set, self.regions)
            return self._ws_runs

    def _place_all(self, region: Region, lo: int, hi: int, kind: int, counters: WorkerCounters,
                   bounce: Optional[Mapping], uffd: Userfaultfd) -> bool:
        """Claim and place what is unclaimed of ``[lo, hi)`` (one kind); False when stopping."""
        claims = self.claims
        for a, b in claims.claim_range(region.index, lo, hi):
            placed = self.place(region, a, b, kind, counters, bounce, uffd)
            while placed is None:  # events pending: the fault loop reads them
                if self.stopping:
                    claims.release(region.index, a, b)
                    return False
                time.sleep(0.0001)
                placed = self.place(region, a, b, kind, counters, bounce, uffd)
            counters.pages += placed
        return True


def _runs_of(pages: Sequence[Sequence[int]], regions: List[Region]) -> List[Tuple[int, int, int]]:
    """``[region index, 4 KiB page]`` pages as ``(region, first unit, end unit)`` runs, in order.

    Consecutive pages of one region and one kind (data, zero) become one run;
    a unit already listed is skipped (with huge pages, several 4 KiB pages
    share one 2 MiB unit).
    """
    runs: List[List[int]] = []
    taken = set()
    for index, page in pages:
        if not 0 <= index < len(regions):
            continue
        region = regions[index]
        unit = page * PAGE_SIZE // region.unit
        if unit >= region.units or (index, unit) in taken:
            continue
        taken.add((index, unit))
        last = runs[-1] if runs else None
        if (last is not None and last[0] == index and last[2] == unit
                and region.kind(unit) == region.kind(last[1])):
            last[2] = unit + 1
        else:
            runs.append([index, unit, unit + 1])
    return [(a, b, c) for a, b, c in runs]


_start_thread = start_thread    # the old name


def _lower_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps less favoured by the scheduler (best effort)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass
