"""Fast snapshot load: guest RAM usable at once, filled behind the guest's back.

How it works
============
``LazyLoader`` maps anonymous memory for every RAMBlock of a mapped-ram
snapshot, registers all of it with one userfaultfd in MISSING mode and only
then reports itself ready.  From that moment any access to a page that is not
yet there traps into the kernel, which queues a fault message on the uffd and
puts the accessing thread to sleep.  Two workers then race to fill memory:

* the **fault loop** polls the uffd and a wake fd, reads fault messages in
  batches, and places each faulting page with one ``UFFDIO_COPY`` straight
  from a read-only mmap of the snapshot file (or ``UFFDIO_ZEROPAGE`` when the
  block's bitmap says the page is zero).  The ioctl installs the whole page
  atomically and wakes the sleeping thread: nobody ever sees half a page.
* the **prefetcher** walks every block in file order by runs of present and
  zero pages and places them in large chunks (2 MiB by default), one ioctl per
  chunk, with no per-page Python loop.

Both go through the **claim map**: one byte per page, ``UNCLAIMED`` ->
``CLAIMED`` -> ``PLACED``, with the claim taken under a lock (for the
common fault, one unclaimed 4 KiB page, claim, ioctl and mark happen in one
hold of it).  Whoever claims a page places it; the other side leaves it alone.  One exception keeps a
fault from waiting for a whole prefetch chunk: when the fault loop reads a
fault for a page the prefetcher has claimed but not yet placed (its 2 MiB
copy may be in flight), it copies that one page itself.  The kernel installs
a page once: whichever copy comes second gets ``EEXIST`` for it, wakes it and
skips it, and the installer alone marks it placed.  Prefetch threads also run
at a lower scheduling priority (nice +10) than the fault loop, so a fault is
served before the next chunk when CPUs are short.  A fault for a page already
``PLACED`` is a message that was
read after the page arrived, or a page that was dropped again: the loop issues
the placement once more and the kernel answers ``EEXIST`` ("already there",
counted in ``eexist``, and the range is woken) or, if the page really was
dropped, installs it again (counted in ``double_placements``: a healthy load
shows zero).

When the last page is placed, every block is unregistered, the uffd and the
file mapping are closed, and the memory is ordinary anonymous memory.

Page sources
============
The loader sees an image only through :mod:`uffdpy.pagesource`: regions with
a bitmap of pages that hold data, and where those bytes are in the file
(``file_offset``, ``file_bytes``).  A mapped-ram block and an ELF ``PT_LOAD``
segment are both such regions.  ``UFFDIO_COPY`` needs a page-aligned source,
so pages whose bytes are not page-aligned in the file (QEMU and gdb pack ELF
segments right after the headers), and a page only partly in the file, are
first assembled in a small bounce buffer that each worker owns (``memmove``
without the GIL, the rest zeroed).  With ``huge_pages=True`` guest memory is
hugetlbfs and the unit of placement is a 2 MiB page: one kind per unit
(all from the file, all zero, or mixed and assembled), and zero units are
copied from never-written memory because hugetlbfs has no ZEROPAGE.

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
the pages that were placed stay readable for a post-mortem.  For the process
server the claim map lives in ``MAP_SHARED`` memory, so this process knows
what a dead server had placed.

Servers and the GIL
===================
``server="thread"`` runs the fault loop and the prefetcher as threads of this
process.  A Python thread that touches not-yet-loaded guest memory *while
holding the GIL* (``bytes(mem[a:b])``, ``struct.unpack_from``, numpy) sleeps
in the kernel with the GIL held; the fault loop then can never run to serve
it, and the whole interpreter deadlocks.  With the thread server, touch guest
memory only without the GIL: ``ctypes.memmove``/``ctypes.memset``, a KVM vCPU,
or from another process.  ``scripts/gil_deadlock.py`` shows the deadlock (under
a timeout) and the cure.

``server="process"`` registers the memory here (a uffd belongs to the address
space that created it), then forks a server process that inherits the uffd,
the parsed snapshot and the file mapping and runs both workers there.  Serving
a fault then needs nothing from this process, so any Python code here may read
guest memory while it loads.  This process keeps its own copy of the uffd
until completion, so a dying server never lets the kernel fill pending faults
with zeros: its unplaced pages are fenced as above, and ``wait()`` raises
``ServerDiedError`` naming the exit status.  The fork happens while
the constructor holds the GIL; the child uses only objects made before the
fork and new threads, and leaves with ``os._exit``.

``server="interpreter"`` (Python 3.13 or newer) runs both workers in a
subinterpreter made with the "isolated" config, which has its own GIL
(PEP 684).  It shares this process's address space and fd table, so nothing
is forked or copied: it serves through a dup of this uffd, from this
process's file mapping, into these mappings, and claims pages in a second
view (another mmap of the same memfd) of the claim map.  A host thread of
this interpreter sits in ``_interpreters.exec`` for the whole load, which
switches it to the subinterpreter's GIL and leaves ours free, so any Python
code here may read guest memory while it loads, as with the process server;
and no GIL is shared between the fault loop and the threads it serves, so
the fault loop may busy-poll (measured with a minimal handler: 1.3-1.7x of a
C handler's fault latency in every placement, where a busy thread sharing the
GIL with a Python toucher is 2.3-2.7x; the README has the loader's own
figures).  Only numbers
cross over (fds, addresses, the bitmaps as bytes); the result comes back as
a one-line JSON report on a pipe.  If the subinterpreter fails, it fences
the unplaced pages itself before reporting: a thread of ours may be asleep
on one of them while holding our GIL, so we might never get to.

Two CPython facts shape it.  Python 3.12 has own-GIL subinterpreters but
its ``_ctypes`` refuses to load in one, so 3.13 is the first that works.
And CPython 3.13 aborts a child forked while any subinterpreter exists
("PyThreadState_Get: ... the GIL is released"): idle subinterpreters (they
are pooled, since making one and importing uffdpy in it takes ~150 ms; see
``prepare_interpreter_servers``) are destroyed before every ``os.fork()``,
and a process server is refused while an interpreter server is loading.
"""
from __future__ import annotations

import atexit
import bisect
import ctypes
import dataclasses
import errno
import importlib.util
import json
import mmap
import os
import re
import select
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar,
                    Union)

from . import ioctl
from .errors import UffdpyError
from .memory import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, release_views
from .pagesource import (PageRegion, PageSource, bitmap_runs, bitmap_runs_in, count_bits,
                         open_image)
from .uffd import Filler, RegisterMode, UffdError, Userfaultfd
from .workload import latency_summary

__all__ = [
    "ClaimMap",
    "EagerLoader",
    "HAVE_INTERPRETERS",
    "LazyLoader",
    "LoaderError",
    "SERVERS",
    "ServerDiedError",
    "Stats",
    "prepare_interpreter_servers",
    "release_interpreter_servers",
]

#: The ways to run the fault loop and the prefetcher (``LazyLoader(server=...)``).
SERVERS = ("thread", "process", "interpreter")
#: Whether this Python can run ``server="interpreter"``: own-GIL subinterpreters
#: in which ctypes loads, with the ``_interpreters`` module (CPython 3.13+).
HAVE_INTERPRETERS = importlib.util.find_spec("_interpreters") is not None

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 2 * MiB
#: Memory for each block is aligned like this (THP-friendly, as QEMU does).
BLOCK_ALIGN = 2 * MiB
#: At most this many bytes per ``pread`` in the eager loader (QEMU 10's value).
EAGER_READ_BYTES = 1 * MiB
#: Prefetch threads run this much nicer than the fault loop (and the guest's
#: threads): when CPUs are short, a fault is served before the next chunk.
PREFETCH_NICE = 10
#: Bytes of the file mapping the source populator maps per ``madvise`` call.
POPULATE_BYTES = 2 * MiB
#: Seconds an interpreter server may take to start before the load is abandoned.
INTERPRETER_START_TIMEOUT = 60.0
#: Fault messages read per ``read`` call.
MSG_BATCH = 64
_MSG_SIZE = 32  # sizeof(struct uffd_msg)


class LoaderError(UffdpyError, RuntimeError):
    """The loader stopped because a worker failed; the worker's error is ``__cause__``."""


class ServerDiedError(LoaderError):
    """The fault-server process exited before every page was placed."""

    def __init__(self, message: str, *, pid: int, status: Optional[int] = None,
                 signal_number: Optional[int] = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.status = status
        self.signal_number = signal_number


# --------------------------------------------------------------------------- stats

@dataclasses.dataclass
class Stats:
    """What a load did.  Times in seconds, latencies in microseconds, sizes in bytes."""

    time_to_ready_s: float = 0.0
    time_to_complete_s: Optional[float] = None
    faults: int = 0
    fault_service_us: Dict[str, float] = dataclasses.field(
        default_factory=lambda: latency_summary(()))
    pages_by_fault: int = 0
    pages_by_prefetch: int = 0
    zero_pages: int = 0
    bytes_copied: int = 0
    eexist: int = 0
    eagain: int = 0
    double_placements: int = 0
    total_pages: int = 0
    placed_pages: int = 0

    def as_dict(self) -> Dict[str, Any]:
        """The stats as a JSON-ready dict."""
        return dataclasses.asdict(self)


class _Counters:
    """Per-worker tallies; each worker owns one, so no locking is needed."""

    __slots__ = ("faults", "service_ns", "pages", "zero_pages", "bytes_copied",
                 "eexist", "eagain")

    def __init__(self) -> None:
        self.faults = 0
        self.service_ns: List[int] = []
        self.pages = 0
        self.zero_pages = 0
        self.bytes_copied = 0
        self.eexist = 0
        self.eagain = 0


# ----------------------------------------------------------------------- claim map

UNCLAIMED, CLAIMED, PLACED = 0, 1, 2


class ClaimMap:
    """Per-page state shared by the fault loop and the prefetcher.

    One byte per page and block: ``UNCLAIMED`` (0), ``CLAIMED`` (1, somebody is
    placing it), ``PLACED`` (2).  Claims are taken under one lock, held by
    these methods only for the few C-level bytearray operations a claim needs,
    so exactly one worker places each page.  (The fault loop's one-page fast
    path goes through ``lock`` and ``states`` to claim, place and mark a page
    in one hold, across that one 4 KiB ioctl; a 2 MiB prefetch copy never
    holds it.)  All methods work on whole ranges with C-level buffer
    primitives (find, slices): no per-page Python loop.

    With ``shared=True`` the bytes live in ``MAP_SHARED`` memory (a memfd), so
    a process forked after construction (the process server) or a second view
    (``attach``, the interpreter server) updates what this one reads: the
    loader then knows which pages a dead server had placed.  The
    lock is per process: only one process may claim.  One memfd and one
    mapping hold every block's bytes, one after the other (``offsets``), so an
    image with thousands of regions costs one fd and one mapping, not one per
    region (``EMFILE``, ``vm.max_map_count``).  The first ``HEADER_BYTES``
    are reserved (they keep an empty map mappable, and leave room for
    counters a server may publish).
    """

    #: bytes before the first block's state
    HEADER_BYTES = 128

    def __init__(self, pages_per_block: Sequence[int],
                 on_complete: Optional[Callable[[], None]] = None, *,
                 shared: bool = False, _attach_fd: int = -1) -> None:
        self._pages = list(pages_per_block)
        self._base = [self.HEADER_BYTES + off for off in self.offsets()]
        size = self.HEADER_BYTES + sum(self._pages)
        #: the memfd holding the state when shared (-1 otherwise); owned
        #: (closed by ``close``) unless this map was made by ``attach``
        self.fd = -1
        self._owns_fd = False
        self._buf: Any
        if shared or _attach_fd >= 0:
            fd = _attach_fd
            if _attach_fd < 0:
                fd = os.memfd_create("uffdpy-claims", os.MFD_CLOEXEC)
            try:
                if _attach_fd < 0:
                    os.ftruncate(fd, size)
                self._buf = mmap.mmap(fd, size)
            except BaseException:
                if _attach_fd < 0:
                    os.close(fd)
                raise
            self.fd = fd
            self._owns_fd = _attach_fd < 0
        else:
            self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._state: List[memoryview] = [self._view[b:b + n]
                                         for b, n in zip(self._base, self._pages)]
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self.total_pages = sum(pages_per_block)
        self.placed_pages = 0
        self.double_placements = 0
        self.complete = threading.Event()
        if self.total_pages == 0:
            self.complete.set()

    @classmethod
    def attach(cls, fd: int, pages_per_block: Sequence[int]) -> "ClaimMap":
        """A view of the shared map in memfd ``fd`` (made by ``shared=True``) from elsewhere.

        The state is the same memory; the counters and the lock are this
        object's own, so only one side may claim and place.  ``fd`` stays the
        caller's (the view's mapping holds a dup of it).
        """
        return cls(pages_per_block, _attach_fd=fd)

    def offsets(self) -> List[int]:
        """Where each block's state starts, in bytes after the header."""
        out, off = [], 0
        for n in self._pages:
            out.append(off)
            off += n
        return out

    def placed_count(self) -> int:
        """Pages in state ``PLACED`` right now, read from the state itself.

        Unlike ``placed_pages`` this sees placements made through another
        view of a shared map (a server process or interpreter).
        """
        return self._buf[self.HEADER_BYTES:].count(_PLACED)

    def state(self, block: int, page: int) -> int:
        """The state of one page (``UNCLAIMED``, ``CLAIMED`` or ``PLACED``)."""
        return self._state[block][page]

    def claim(self, block: int, page: int) -> int:
        """Claim one page; return its state *before* the call (``UNCLAIMED`` = now yours)."""
        st = self._state[block]
        with self._lock:
            old = st[page]
            if old == UNCLAIMED:
                st[page] = CLAIMED
        return old

    def claim_range(self, block: int, first: int, end: int) -> List[Tuple[int, int]]:
        """Claim every unclaimed page in ``[first, end)``; return the claimed sub-ranges."""
        buf, b = self._buf, self._base[block]
        out: List[Tuple[int, int]] = []
        end += b
        with self._lock:
            i = buf.find(_UNCLAIMED, b + first, end)
            while i != -1:
                j = buf.find(_CLAIMED, i, end)
                k = buf.find(_PLACED, i, end)
                stop = min(x for x in (j, k, end) if x != -1)
                buf[i:stop] = _CLAIMED * (stop - i)
                out.append((i - b, stop - b))
                i = buf.find(_UNCLAIMED, stop, end) if stop < end else -1
        return out

    def claim_following(self, block: int, page: int, limit: int) -> int:
        """Claim unclaimed pages right after ``page`` (up to ``limit`` pages); return the end."""
        st = self._state[block]
        end = min(self._pages[block], page + 1 + limit)
        with self._lock:
            stop = page + 1
            while stop < end and st[stop] == UNCLAIMED:
                stop += 1
            st[page + 1:stop] = _CLAIMED * (stop - page - 1)
        return stop

    def any_unclaimed(self, block: int, first: int, end: int) -> bool:
        """Whether some page of ``[first, end)`` is still unclaimed (a peek, no lock)."""
        b = self._base[block]
        return self._buf.find(_UNCLAIMED, b + first, b + end) != -1

    def release(self, block: int, first: int, end: int) -> None:
        """Give back the claimed-but-unplaced pages of ``[first, end)`` (placed ones stay)."""
        buf, b = self._buf, self._base[block]
        with self._lock:
            buf[b + first:b + end] = buf[b + first:b + end].replace(_CLAIMED, _UNCLAIMED)

    def mark_placed(self, block: int, first: int, end: int) -> None:
        """Record ``[first, end)`` as placed; set ``complete`` when the last page lands."""
        buf, b = self._buf, self._base[block]
        n = end - first
        with self._lock:
            already = buf[b + first:b + end].count(_PLACED)
            buf[b + first:b + end] = _PLACED * n
            self.double_placements += already
            self.placed_pages += n - already
            done = self.placed_pages == self.total_pages
        if done:
            self.completed()

    def mark_one(self, block: int, page: int) -> None:
        """``mark_placed`` of a single page."""
        st = self._state[block]
        with self._lock:
            if st[page] == PLACED:
                self.double_placements += 1
                return
            st[page] = PLACED
            self.placed_pages += 1
            done = self.placed_pages == self.total_pages
        if done:
            self.completed()

    def completed(self) -> None:
        """Every page is placed: set ``complete`` and tell the owner."""
        self.complete.set()
        if self._on_complete is not None:
            self._on_complete()

    @property
    def lock(self) -> Any:
        """The claim lock, for the fault loop's one-page fast path (see ``_Server._serve``)."""
        return self._lock

    @property
    def states(self) -> List[Any]:
        """Each block's state bytes, for the fault loop's one-page fast path."""
        return self._state

    def unplaced_runs(self, block: int) -> List[Tuple[int, int]]:
        """``[first, end)`` runs of pages of ``block`` not placed (yet)."""
        b = self._base[block]
        return [(m.start() - b, m.end() - b)
                for m in _UNPLACED_RUN.finditer(self._buf, b, b + self._pages[block])]

    def close(self) -> None:
        """Release the shared state memory and its fd (idempotent); counters stay readable."""
        for st in self._state:
            st.release()
        self._view.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()                  # and the mapping's own dup of the fd
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


_UNCLAIMED, _CLAIMED, _PLACED = b"\x00", b"\x01", b"\x02"
_UNPLACED_RUN = re.compile(rb"[\x00\x01]+")


# ------------------------------------------------------------------------ placement

#: How a page is placed: ZEROPAGE, COPY straight from the file mapping, or
#: COPY from a bounce buffer (the bytes are not page-aligned in the file, or
#: the page is only partly in the file and the rest must read as zeros).
ZERO, DIRECT, BOUNCE = 0, 1, 2


_KIND_RUN = re.compile(rb"\x00+|\x01+|\x02+")


class _Region:
    """One region as the workers see it: guest address, where its bytes are, page kinds.

    Placement works in *units*: the source's pages (4 KiB), or 2 MiB huge
    pages when guest memory is hugetlbfs.  A page's kind comes from the
    source's bitmap and the ``direct_pages`` cut, with no per-page setup
    work (ready stays in the milliseconds for any size).  Huge units get one
    precomputed kind each: ``DIRECT`` only when all their pages are, ``ZERO``
    when all are zero, ``BOUNCE`` (assembled in a bounce buffer) otherwise.
    """

    __slots__ = ("index", "name", "start", "end", "length", "page_size", "pages", "unit",
                 "units", "src", "file_offset", "source", "bitmap", "direct_pages", "kinds",
                 "needs_bounce", "one_page_fast")

    def __init__(self, index: int, region: Union[PageRegion, "_SharedRegion"], start: int,
                 file_base: int, unit: int) -> None:
        self.index = index
        self.source = region
        self.name = region.name
        self.page_size = ps = region.page_size
        self.pages = region.pages
        self.unit = unit
        self.units = -(-region.length // unit)
        self.length = self.units * unit
        self.start = start
        self.end = start + self.length
        self.src = file_base + region.file_offset
        self.file_offset = region.file_offset
        self.bitmap = region.bitmap
        # Present pages below this are copied straight from the file mapping;
        # present pages at or above it go through a bounce buffer.
        aligned = region.file_offset % PAGE_SIZE == 0 and ps % PAGE_SIZE == 0
        self.direct_pages = min(region.file_bytes // ps if aligned else 0, self.pages)
        per_unit = unit // ps
        #: one unit is one 4 KiB page: the fault loop's one-page fast path applies
        self.one_page_fast = unit == PAGE_SIZE and ps == PAGE_SIZE
        self.kinds: Optional[bytearray] = None
        if per_unit == 1:
            self.needs_bounce = count_bits(self.bitmap, self.direct_pages, self.pages) > 0
        else:
            kinds = self.kinds = bytearray(self.units)
            for u in range(self.units):
                lo, hi = u * per_unit, min((u + 1) * per_unit, self.pages)
                n = count_bits(self.bitmap, lo, hi)
                if n:
                    whole = n == per_unit and hi <= self.direct_pages
                    kinds[u] = DIRECT if whole else BOUNCE
            self.needs_bounce = BOUNCE in kinds

    def kind(self, u: int) -> int:
        """The kind of unit ``u``: ``ZERO``, ``DIRECT`` or ``BOUNCE``."""
        kinds = self.kinds
        if kinds is not None:
            return kinds[u]
        if not self.bitmap[u >> 3] >> (u & 7) & 1:
            return ZERO
        return DIRECT if u < self.direct_pages else BOUNCE

    def runs(self) -> Iterator[Tuple[int, int, int]]:
        """``(first, count, kind)`` maximal runs of units of one kind, in order."""
        kinds = self.kinds
        if kinds is not None:
            for m in _KIND_RUN.finditer(kinds):
                yield m.start(), m.end() - m.start(), kinds[m.start()]
            return
        cut = self.direct_pages
        for first, count, present in self.source.runs():
            end = first + count
            if not present:
                yield first, count, ZERO
            elif end <= cut:
                yield first, count, DIRECT
            elif first >= cut:
                yield first, count, BOUNCE
            else:
                yield first, cut - first, DIRECT
                yield cut, end - cut, BOUNCE

    def fill_bounce(self, first: int, end: int, buffer: Mapping, fd: int, path: str) -> int:
        """Assemble units ``[first, end)`` in ``buffer``, read from file ``fd``; return its address.

        The bytes are read with ``preadv`` (without the GIL), never through
        the file mapping: a file truncated since it was opened then gives a
        short read, reported as a ``LoaderError`` naming ``path`` and the
        offset, where a read through the mapping would be SIGBUS for the
        whole process.  Zero pages, and bytes past the region's
        ``file_bytes`` or its last page, are zeroed (``ctypes.memset``).

        Raises:
            LoaderError: the file is shorter than its header claims, or unreadable.
        """
        ps = self.page_size
        per_unit = self.unit // ps
        a, b = first * per_unit, end * per_unit
        base = buffer.address - a * ps
        file_bytes = self.source.file_bytes
        last = min(b, self.pages)
        for f, c, present in bitmap_runs_in(self.bitmap, a, last):
            lo, hi = f * ps, (f + c) * ps
            have = max(0, min(hi, file_bytes) - lo) if present else 0
            done = 0
            while done < have:
                offset = self.file_offset + lo + done
                try:
                    got = os.preadv(fd, [(ctypes.c_char * (have - done)).from_address(
                        base + lo + done)], offset)
                except OSError as exc:
                    raise _unreadable(path, self.name, offset, f"{exc}") from exc
                if got == 0:
                    raise _unreadable(path, self.name, offset,
                                      f"read 0 of {have - done} bytes: end of file")
                done += got
            if have < hi - lo:
                ctypes.memset(base + lo + have, 0, hi - lo - have)
        if last < b:                                   # a huge unit past the region's end
            ctypes.memset(base + last * ps, 0, (b - last) * ps)
        return buffer.address


def _unreadable(path: str, name: str, offset: int, detail: str) -> LoaderError:
    """The error for a page whose bytes the file no longer has (truncated or changed)."""
    try:
        size = f"{os.stat(path).st_size:#x} bytes now"
    except OSError as exc:
        size = f"cannot stat it: {exc.strerror}"
    return LoaderError(f"{path}: region {name!r} at file offset {offset:#x}: the file is "
                       f"shorter than its header claims, or the page's file offset is "
                       f"unreadable (was it truncated or changed during the load? "
                       f"{size}); {detail}")


class _Server:
    """The fault loop and the prefetcher over one uffd; runs in-process or in the child."""

    def __init__(self, uffd: Userfaultfd, regions: List[_Region], claims: ClaimMap,
                 wake_fd: int, *, prefetch: bool, chunk_bytes: int,
                 fault_around_pages: int, server_cpu: Optional[int],
                 busy_poll: bool, prefetch_threads: int = 1,
                 populate_source: bool = False, daemon_threads: bool = True,
                 file_fd: int = -1, path: str = "") -> None:
        self.uffd = uffd
        #: the image file, read into the bounce buffers with preadv (never
        #: through the mapping: see ``_Region.fill_bounce``); the caller's fd
        self.file_fd = file_fd
        self.path = path
        # an isolated subinterpreter may not start daemon threads
        self.daemon_threads = daemon_threads
        self.regions = regions
        # mmap hands out addresses top-down: bisect needs them sorted
        self.by_address = sorted(regions, key=lambda r: r.start)
        self.starts = [r.start for r in self.by_address]
        self._last_region: Optional[_Region] = self.by_address[0] if regions else None
        self.claims = claims
        self.wake_fd = wake_fd
        self.prefetch_enabled = prefetch
        self.chunk_bytes = chunk_bytes
        self.fault_around_pages = fault_around_pages
        self.server_cpu = server_cpu
        self.busy_poll = busy_poll
        self.prefetch_threads = prefetch_threads
        self.populate_source = populate_source
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.fault_counters = _Counters()
        self.prefetch_counters = [_Counters() for _ in range(prefetch_threads)]
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
        self.threads: List[threading.Thread] = []
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
        self.claims._on_complete = self._wake
        self._on_end = on_end
        if self.populate_source:
            self.threads.append(threading.Thread(
                target=self._run, args=(self.populate,), name="uffdpy-populate",
                daemon=self.daemon_threads))
        if self.prefetch_enabled:
            for k in range(self.prefetch_threads):
                self.threads.append(threading.Thread(
                    target=self._run, args=(lambda k=k: self.prefetch(k),),
                    name=f"uffdpy-prefetch-{k}", daemon=self.daemon_threads))
        self.threads.insert(0, threading.Thread(target=self._fault_thread,
                                                name="uffdpy-fault-loop",
                                                daemon=self.daemon_threads))
        started: List[threading.Thread] = []
        try:
            for t in self.threads[1:] + self.threads[:1]:   # the loop joins the others: last
                _start_thread(t)
                started.append(t)
        except BaseException:
            # Nothing runs the fault loop: stop the threads that did start
            # (they wait for ``go``, then see ``stopping``) and end here.
            self.stop()
            for t in started:
                t.join(30.0)
            self.threads = [t for t in started if t.is_alive()]
            self.ended.set()
            raise
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
        if self.wake_fd >= 0:
            _signal_fd(self.wake_fd)

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
        stats.fault_service_us = latency_summary(f.service_ns)
        stats.pages_by_fault = f.pages
        stats.pages_by_prefetch = sum(p.pages for p in ps)
        stats.zero_pages = f.zero_pages + sum(p.zero_pages for p in ps)
        stats.bytes_copied = f.bytes_copied + sum(p.bytes_copied for p in ps)
        stats.eexist = f.eexist + sum(p.eexist for p in ps)
        stats.eagain = f.eagain + sum(p.eagain for p in ps)
        stats.double_placements = self.claims.double_placements
        stats.total_pages = self.claims.total_pages
        stats.placed_pages = self.claims.placed_pages
        return stats

    # -- placing
    def _place(self, region: _Region, first: int, end: int, kind: int,
               counters: _Counters, bounce: Optional[Mapping],
               uffd: Union[Userfaultfd, Filler]) -> Optional[int]:
        """Place pages ``[first, end)`` of one kind with as few ioctls as possible.

        ``bounce`` is the calling worker's bounce buffer (``BOUNCE`` pages),
        ``uffd`` the calling worker's way to the ioctls (the fault loop's own
        ``Filler``, or the thread-safe ``Userfaultfd`` methods).  The pages
        this call installs are marked placed in the claim map here; pages the
        kernel already had (``EEXIST``: the other worker installed them) are
        woken and skipped, and their installer marks them.  Returns the number
        of pages installed, or None when the kernel says events are pending
        and nothing was done: retry later.
        """
        ps = region.unit
        dst = region.start + first * ps
        length = (end - first) * ps
        present = kind != ZERO
        if kind == DIRECT:
            src = region.src + first * ps
        elif kind == BOUNCE:
            assert bounce is not None and bounce.length >= length
            src = region.fill_bounce(first, end, bounce, self.file_fd, self.path)
        elif self.zero_source is not None:     # hugetlbfs: no ZEROPAGE, copy zeros
            src = self.zero_source.address
            present = True
        else:
            src = 0
        installed = 0
        page = first
        claims = self.claims
        while length:
            if present:
                try:
                    done = uffd.copy(dst, src, length)
                except UffdError as exc:
                    raise self._copy_failed(region, page, kind, exc) from exc
            else:
                done = uffd.zeropage(dst, length)
            if done > 0:
                if done < length:              # EAGAIN after progress: go on from there
                    counters.eagain += 1
                claims.mark_placed(region.index, page, page + done // ps)
                installed += done
                page += done // ps
                dst += done
                src += done
                length -= done
            elif done == -errno.EEXIST:        # first page already there: wake, skip it
                counters.eexist += 1
                uffd.wake(dst, ps)
                page += 1
                dst += ps
                src += ps
                length -= ps
            elif done == -errno.EAGAIN:        # non-cooperative events pending
                counters.eagain += 1
                if installed == 0 and length == (end - first) * ps:
                    return None
                time.sleep(0)                  # partly done: let the reader drain, retry
            else:
                raise OSError(-done, f"unexpected fill result {done}")
        if kind == ZERO:
            counters.zero_pages += installed // region.page_size
        else:
            counters.bytes_copied += installed
        return installed // ps

    def _copy_failed(self, region: _Region, unit: int, kind: int,
                     exc: UffdError) -> BaseException:
        """What a failed ``UFFDIO_COPY`` of ``unit`` means: EFAULT from the file is a LoaderError.

        A copy straight from the file mapping (``DIRECT``) whose source the
        file no longer has (truncated since it was opened) fails with EFAULT.
        """
        if kind != DIRECT or exc.errno != errno.EFAULT:
            return exc
        offset = region.file_offset + unit * region.unit
        return _unreadable(self.path, region.name, offset,
                           f"{exc.call}: [Errno {exc.errno}] {exc.strerror}")

    # -- the fault loop
    def fault_loop(self) -> None:
        """Serve faults until every page is placed or ``stop()`` is called."""
        if self.server_cpu is not None:
            os.sched_setaffinity(threading.get_native_id(), {self.server_cpu})
        ufd = self.uffd.fileno()
        poller = select.poll()
        poller.register(ufd, select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
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
                if buf[k * _MSG_SIZE] == pagefault:
                    addresses.append(words[k * 4 + 2])
            for address in addresses:
                if not serve(address, counters, filler):
                    deferred.append(address)
                service_ns.append(clock() - t_read)
            counters.faults += len(addresses)

    def _region_of(self, address: int) -> _Region:
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0 or address >= self.by_address[i].end:
            raise LoaderError(f"fault at 0x{address:x} outside every registered block")
        region = self._last_region = self.by_address[i]
        return region

    def _serve(self, address: int, counters: _Counters, filler: Filler) -> bool:
        """Resolve one fault; False when it must be retried after events are read."""
        region = self._last_region                # faults cluster: try the last one first
        if region is None or not region.start <= address < region.end:
            region = self._region_of(address)
        claims = self.claims
        start = region.start
        page = (address - start) // region.unit
        if region.one_page_fast and not self.fault_around_pages:
            # The common case, one 4 KiB page from the file or one zero page,
            # unclaimed: claim, place and mark it under one hold of the claim
            # lock.  The lock is held across this one-page ioctl (a few µs;
            # the prefetcher never holds it across its own), which saves a
            # second acquisition and two calls on the path every fault takes.
            st = claims.states[region.index]
            done = 0
            with claims.lock:
                if st[page] == UNCLAIMED:
                    offset = page << 12
                    if not region.bitmap[page >> 3] >> (page & 7) & 1:
                        done = filler.zeropage(start + offset, PAGE_SIZE)
                        present = False
                    elif page < region.direct_pages:
                        try:
                            done = filler.copy(start + offset, region.src + offset, PAGE_SIZE)
                        except UffdError as exc:
                            raise self._copy_failed(region, page, DIRECT, exc) from exc
                        present = True
                    if done == PAGE_SIZE:
                        st[page] = PLACED
                        claims.placed_pages += 1
                        last = claims.placed_pages == claims.total_pages
            if done == PAGE_SIZE:
                counters.pages += 1
                if present:
                    counters.bytes_copied += PAGE_SIZE
                else:
                    counters.zero_pages += 1
                if last:
                    claims.completed()
                return True
        old = claims.claim(region.index, page)
        kind = region.kind(page)
        if old == CLAIMED:
            # In a prefetch chunk still in flight: place this one page now
            # instead of waiting for the whole chunk.  The kernel installs it
            # once; whichever copy comes second gets EEXIST and skips it.
            placed = self._place(region, page, page + 1, kind, counters, self.fault_bounce,
                                 filler)
            counters.pages += placed or 0
            return placed is not None
        if old == UNCLAIMED and not self.fault_around_pages and kind != BOUNCE:
            # the common cases, one page from the file or one zero page: one ioctl, one store
            unit = region.unit
            offset = page * unit
            if kind == DIRECT:
                try:
                    done = filler.copy(region.start + offset, region.src + offset, unit)
                except UffdError as exc:
                    raise self._copy_failed(region, page, kind, exc) from exc
                counters.bytes_copied += unit if done == unit else 0
            elif self.zero_source is None:
                done = filler.zeropage(region.start + offset, unit)
                counters.zero_pages += 1 if done == unit else 0
            else:
                done = 0                      # hugetlbfs zeros: the general path
            if done == unit:
                counters.pages += 1
                claims.mark_one(region.index, page)
                return True
            claims.release(region.index, page, page + 1)   # not placed: the general path
            old = claims.claim(region.index, page)
            if old == CLAIMED:
                return self._serve(address, counters, filler)
        bounce = self.fault_bounce
        if old == PLACED:
            # Read after the page arrived (the kernel answers EEXIST and we
            # wake), or the page was dropped since: then this places it again.
            placed = self._place(region, page, page + 1, kind, counters, bounce, filler)
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
        placed = self._place(region, page, end, kind, counters, bounce, filler)
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
        _lower_priority(PREFETCH_NICE)
        counters = self.prefetch_counters[lane]
        bounce = self.prefetch_bounce[lane]
        uffd = self.uffd
        claims = self.claims
        lanes = self.prefetch_threads
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
                    for a, b in claims.claim_range(region.index, lo, hi):
                        placed = self._place(region, a, b, kind, counters, bounce, uffd)
                        while placed is None:  # events pending: the fault loop reads them
                            if self.stopping:
                                claims.release(region.index, a, b)
                                return
                            time.sleep(0.0001)
                            placed = self._place(region, a, b, kind, counters, bounce, uffd)
                        counters.pages += placed


def _start_thread(thread: threading.Thread) -> None:
    """``thread.start()``; a thread the system cannot start is a LoaderError naming it.

    Raises:
        LoaderError: the thread could not start (``RuntimeError: can't start
            new thread``: a pids limit, RLIMIT_NPROC, no memory for a stack).
    """
    try:
        thread.start()
    except RuntimeError as exc:
        raise LoaderError(f"cannot start the loader's thread {thread.name!r}: {exc} "
                          f"(a pids or RLIMIT_NPROC limit, or no memory for its "
                          f"stack?)") from exc


def _lower_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps less favoured by the scheduler (best effort)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass


def _signal_fd(fd: int) -> None:
    try:
        os.write(fd, struct.pack("=Q", 1))
    except (BlockingIOError, OSError):
        pass  # already signalled (counter full) or closed during shutdown


def _eventfd() -> int:
    if hasattr(os, "eventfd"):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return ioctl.libc.eventfd(0, ioctl.EFD_CLOEXEC | ioctl.EFD_NONBLOCK)  # Python < 3.10


# -------------------------------------------------------------------------- loaders

#: A page source (a mapped-ram ``Snapshot``, an ``ElfImage``) or the path of one.
SourceLike = Union[PageSource, str, "os.PathLike[str]"]
SnapshotLike = SourceLike


def _open_source(source: SourceLike) -> Tuple[PageSource, bool]:
    """The source, and whether the loader opened it (and so must close it)."""
    if isinstance(source, (str, os.PathLike)):
        return open_image(os.fspath(source)), True
    return source, False


_L = TypeVar("_L", bound="_LoaderBase")


class _LoaderBase:
    """What both loaders share: one anonymous mapping per region, ``memory()``, ``stats``."""

    _closed = True

    def __init__(self) -> None:
        self._mappings: Dict[str, Mapping] = {}
        self._order: List[str] = []
        self._source: Optional[PageSource] = None
        self._owns_source = False
        self._stats = Stats()

    @property
    def source(self) -> PageSource:
        """The image being loaded (a ``Snapshot``, an ``ElfImage``)."""
        assert self._source is not None
        return self._source

    #: The old name of :attr:`source`, from when only mapped-ram was loaded.
    snapshot = source

    @property
    def block_names(self) -> List[str]:
        """Region (RAMBlock, segment) names, in file order."""
        return list(self._order)

    def memory(self, name: str) -> memoryview:
        """A writable memoryview of region ``name`` (its length in bytes).

        The view is valid until ``close()`` (or the end of the ``with``
        block), which releases it and every slice or cast made from it:
        using one after that raises ``ValueError: operation forbidden on
        released memoryview object`` instead of touching unmapped memory.
        (A view something holds a buffer export of at close, such as a
        ``PickleBuffer`` or a syscall in progress in another thread, cannot
        be released: its region is then left mapped, leaked to its holders,
        rather than pulled away.  Objects keeping the raw address without an
        export, ``numpy.frombuffer`` and ``ctypes.c_char.from_buffer``, are
        not covered: copy what they need before close.)

        While a ``LazyLoader`` with the default ``server="thread"`` is
        loading, reading or writing the view from Python while holding the
        GIL (``bytes(view[a:b])``, ``struct.unpack_from``, numpy) on a page
        not placed yet deadlocks the interpreter: the thread sleeps in the
        kernel with the GIL held, and the fault loop, a thread of this
        interpreter, can never run to serve it.  Touch it only without the
        GIL there (``ctypes.memmove``, a syscall such as ``os.write``, a KVM
        vCPU) or from another process.  ``server="process"`` and
        ``server="interpreter"`` serve faults without this GIL, so any
        Python code may read the view during their loads; once ``wait()``
        has returned True the memory is ordinary memory for every server.

        Raises:
            KeyError: no region of that name.
            ValueError: the loader is closed.
        """
        return self._mapping(name).view()[: self.source.region(name).length]

    def address(self, name: str) -> int:
        """The address of block ``name``'s memory in this process."""
        return self._mapping(name).address

    def _mapping(self, name: str) -> Mapping:
        if self._closed:
            raise ValueError("loader is closed")
        try:
            return self._mappings[name]
        except KeyError:
            raise KeyError(f"no region named {name!r}; regions: {', '.join(self._order)}") from None

    def _map_blocks(self, *, transparent_huge_pages: bool) -> None:
        for block in self.source.regions:
            length = _round_up(block.length, PAGE_SIZE)
            m = Mapping.anonymous(max(length, PAGE_SIZE), align=BLOCK_ALIGN)
            self._mappings[block.name] = m
            self._order.append(block.name)
            advice = ioctl.MADV_HUGEPAGE if transparent_huge_pages else ioctl.MADV_NOHUGEPAGE
            try:
                m.madvise(advice)
            except OSError:
                pass  # THP not configured in this kernel: nothing to turn on or off

    def _map_huge_blocks(self) -> None:
        """hugetlbfs memory for every region, each rounded up to whole 2 MiB pages."""
        need = sum(-(-r.length // HUGE_PAGE_SIZE) for r in self.source.regions)
        for region in self.source.regions:
            length = max(_round_up(region.length, HUGE_PAGE_SIZE), HUGE_PAGE_SIZE)
            try:
                m = Mapping.anonymous(length, align=BLOCK_ALIGN, huge_pages=True)
            except OSError as exc:
                if exc.errno != errno.ENOMEM:
                    raise
                raise OSError(errno.ENOMEM, (
                    f"huge_pages=True needs {need} free 2 MiB pages in the hugetlb pool and "
                    f"mapping region {region.name!r} failed; see HugePages_Free in "
                    f"/proc/meminfo and reserve more, e.g. as root: "
                    f"echo {need} > /proc/sys/vm/nr_hugepages")) from None
            self._mappings[region.name] = m
            self._order.append(region.name)

    def _unmap_blocks(self) -> None:
        release_views(self._mappings.values())     # one scan for every block's views
        for m in self._mappings.values():
            m.close()
        self._mappings.clear()

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(_raise=exc[0] is None)

    def close(self, *, _raise: bool = True) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def wait(self, timeout: Optional[float] = None) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def stats(self) -> Stats:
        """Load statistics (see ``Stats``)."""
        return self._stats


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class EagerLoader(_LoaderBase):
    """The QEMU 10 way, as a baseline: read every present run into memory, then return.

    Memory is mapped as QEMU maps guest RAM (anonymous, transparent huge pages
    allowed); each run of present pages is read with ``preadv`` in calls of at
    most 1 MiB straight into it; zero pages are left untouched (fresh anonymous
    memory reads as zero).  Same ``memory()``/``address()``/``stats`` as
    ``LazyLoader``, so the two compare like with like.

    Raises:
        MappedRamError: the snapshot is malformed (before anything is mapped).
        OSError: mapping or reading failed.
    """

    def __init__(self, snapshot: SnapshotLike) -> None:
        super().__init__()
        t0 = time.perf_counter()
        self._source, self._owns_source = _open_source(snapshot)
        self._closed = False
        try:
            self._map_blocks(transparent_huge_pages=True)
            fd = os.open(self.source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._read_all(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.close()
            raise
        total = time.perf_counter() - t0
        s = self._stats
        s.time_to_ready_s = s.time_to_complete_s = total
        s.total_pages = s.placed_pages = sum(r.pages for r in self.source.regions)

    def _read_all(self, fd: int) -> None:
        s = self._stats
        for region in self.source.regions:
            view = self._mappings[region.name].view()
            ps = region.page_size
            for first, count, present in region.runs():
                if not present:
                    s.zero_pages += count
                    continue
                pos = first * ps
                end = min(pos + count * ps, region.file_bytes)  # the rest reads as zeros
                while pos < end:
                    n = min(EAGER_READ_BYTES, end - pos)
                    got = os.preadv(fd, [view[pos:pos + n]], region.file_offset + pos)
                    if got != n:
                        raise OSError(errno.EIO, f"{self.source.path}: short read of "
                                      f"region {region.name!r} at file offset "
                                      f"{region.file_offset + pos}")
                    pos += n
                s.bytes_copied += count * ps
            view.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Always True: an eager load is complete when the constructor returns."""
        return True

    def close(self, *, _raise: bool = True) -> None:
        """Unmap the memory and close the snapshot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unmap_blocks()
        if self._owns_source and self._source is not None:
            self._source.close()


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
                 huge_pages: bool = False, populate_source: bool = False) -> None:
        super().__init__()
        if prefetch_threads is None:
            prefetch_threads = min(2, len(os.sched_getaffinity(0)))
        if server not in SERVERS:
            raise ValueError(f"server must be one of {', '.join(map(repr, SERVERS))}, "
                             f"not {server!r}")
        if server == "interpreter":
            _interpreters_module()             # before anything is mapped
        elif server == "process":
            _check_fork_allowed()
        if prefetch_chunk_bytes < PAGE_SIZE:
            raise ValueError(f"prefetch_chunk_bytes must be at least {PAGE_SIZE}")
        if fault_around_pages < 0:
            raise ValueError("fault_around_pages must be >= 0")
        if prefetch_threads < 1:
            raise ValueError("prefetch_threads must be >= 1")
        t0 = time.perf_counter()
        self._server_mode = server
        self._huge_pages = huge_pages
        self._uffd: Optional[Userfaultfd] = None
        self._file_map: Optional[Mapping] = None
        self._file_fd = -1
        self._wake_fd = -1
        self._server: Optional[_Server] = None
        self._child_pid = 0
        self._result_fd = -1
        self._monitor: Optional[threading.Thread] = None
        self._progress: Optional[mmap.mmap] = None
        self._regions: List[_Region] = []
        self._claims: Optional[ClaimMap] = None
        self._host: Optional[threading.Thread] = None
        self._host_done = threading.Event()
        self._fd_lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._error_reported = False
        self._failed = False
        self._done = threading.Event()
        self._registered = False
        self._t0 = t0
        self._source, self._owns_source = _open_source(snapshot_or_path)
        self._closed = False
        try:
            self._setup(prefetch=prefetch, chunk_bytes=prefetch_chunk_bytes,
                        populate_source=populate_source,
                        fault_around_pages=fault_around_pages, server_cpu=server_cpu,
                        busy_poll=busy_poll, prefetch_threads=prefetch_threads)
        except BaseException:
            self.close(_raise=False)
            raise
        self._stats.time_to_ready_s = time.perf_counter() - t0
        if self._server is not None:
            self._server.go.set()

    # -- setup, in the order the module essay gives
    def _setup(self, **options: Any) -> None:
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
        # The fd stays open for the workers' reads into bounce buffers.
        self._file_fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
        self._file_map = Mapping.of_file(self._file_fd, _round_up(source.file_size, PAGE_SIZE))
        unit = HUGE_PAGE_SIZE if self._huge_pages else PAGE_SIZE
        regions = [_Region(i, r, self._mappings[r.name].address, self._file_map.address, unit)
                   for i, r in enumerate(source.regions)]
        claims = ClaimMap([r.units for r in regions], shared=self._server_mode != "thread")
        self._regions, self._claims = regions, claims
        self._wake_fd = _eventfd()
        if self._server_mode == "interpreter":
            self._start_interpreter_server(unit, options)
            return
        self._server = _Server(self._uffd, regions, claims, self._wake_fd,
                               file_fd=self._file_fd, path=source.path, **options)
        if self._server_mode == "thread":
            self._server.start(on_end=self._thread_server_ended)
        else:
            self._start_process_server()

    # -- the in-process server
    def _thread_server_ended(self) -> None:
        """Runs in the fault-loop thread once both workers have ended."""
        server = self._server
        assert server is not None
        if server.error is not None:
            self._fail(server.error)
            self._fence_unplaced()
        elif server.claims.complete.is_set():
            self._finish()
        self._done.set()

    # -- the process server
    def _start_process_server(self) -> None:
        server = self._server
        assert server is not None and self._file_map is not None
        # Keep the guest memory out of the child: it must never own a copy.
        for m in self._mappings.values():
            m.madvise(ioctl.MADV_DONTFORK)
        self._progress = mmap.mmap(-1, PAGE_SIZE)    # shared with the child: 2 x u64
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:                                   # the server process
            os.close(read_fd)
            _child_main(server, write_fd, self._progress, parent)
        os.close(write_fd)
        self._child_pid = pid
        self._result_fd = read_fd
        # The parent needs no file mapping: the child serves from its own copy.
        self._file_map.close()
        os.close(self._file_fd)
        self._file_fd = -1
        monitor = threading.Thread(target=self._watch_child, name="uffdpy-server-watch",
                                   daemon=True)
        try:
            _start_thread(monitor)
        except BaseException:
            # Nobody would watch the server: end it now (it has served
            # nothing: ready is not reported yet) and reap it.
            self._child_pid = 0
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            raise
        self._monitor = monitor

    def _watch_child(self) -> None:
        """The monitor thread: act on the server's one-line report, then reap it.

        The report is acted on as soon as its line arrives, before the child
        has exited (tearing down a forked address space takes milliseconds
        that the load need not wait for).  No report by EOF means it died.
        """
        report = _read_report(self._result_fd)
        if report:
            self._act_on_report(report)
            self._done.set()
        pid = self._child_pid
        _, status = os.waitpid(pid, 0)
        self._child_pid = 0
        if not report:
            self._fail(_server_died(pid, status))
            self._fence_unplaced()
            self._done.set()

    def _act_on_report(self, report: Dict[str, Any]) -> None:
        """Act on a server's final report (process or interpreter server)."""
        if report.get("complete"):
            self._apply_child_stats(report)
            self._finish()
        elif report.get("error"):
            self._fail(LoaderError(f"fault server failed: {report['error']}"))
            self._fence_unplaced()
        elif report.get("stopped"):
            self._apply_child_stats(report)

    # -- the interpreter server
    def _start_interpreter_server(self, unit: int, options: Dict[str, Any]) -> None:
        """Start the workers in a subinterpreter with its own GIL; return once they run.

        The spec carries numbers only (fds, addresses): the subinterpreter
        shares this address space and fd table, so it serves from this
        process's file mapping, into these mappings, through a dup of this
        uffd, with a second view of the claim map's memfd.
        """
        assert self._uffd is not None and self._file_map is not None
        assert self._claims is not None
        source = self.source
        interp = _take_interpreter()
        started_fd = _eventfd()
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(started_fd)
            _give_back_interpreter(interp)
            raise
        spec = {
            "uffd": self._uffd.fileno(), "wake": self._wake_fd, "started": started_fd,
            "report": report_w, "claims": self._claims.fd, "file_map": self._file_map.address,
            "file_fd": self._file_fd, "path": source.path,
            "unit": unit, "options": options,
            "regions": [{"name": r.name, "length": r.length, "page_size": r.page_size,
                         "pages": r.pages, "file_offset": r.file_offset,
                         "file_bytes": r.file_bytes,
                         "start": self._mappings[r.name].address} for r in source.regions],
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
        self._host = host
        _live_interpreter_loaders.add(self)
        # The subinterpreter signals started_fd once, when its workers run;
        # once it has, or once it has ended, nobody writes it again and it
        # can be closed.  After a timeout it might still: it stays open.
        deadline = time.monotonic() + INTERPRETER_START_TIMEOUT
        while True:
            started = bool(select.select([started_fd], [], [], 0.05)[0])
            if started or self._host_done.is_set() or time.monotonic() > deadline:
                # a fast load may have started and ended since the select
                started = started or bool(select.select([started_fd], [], [], 0)[0])
                break
        if started or self._host_done.is_set():
            os.close(started_fd)
        if started:
            return
        if not self._host_done.is_set():
            self._stop_interpreter_server()
            raise LoaderError(f"the interpreter server did not start within "
                              f"{INTERPRETER_START_TIMEOUT:.0f} s")
        self._host.join()
        self._error_reported = True
        self._raise_error()
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
            self._host_done.set()
            self._done.set()

    def _stop_interpreter_server(self, timeout: float = 30.0) -> None:
        host = self._host
        if host is None:
            return
        with self._fd_lock:
            if self._wake_fd >= 0:
                _signal_fd(self._wake_fd)
        host.join(timeout)

    def _apply_child_stats(self, report: Dict[str, Any]) -> None:
        for key, value in report.get("stats", {}).items():
            if key not in ("time_to_ready_s", "time_to_complete_s"):
                setattr(self._stats, key, value)

    # -- endings
    def _finish(self) -> None:
        """Every page is placed: unregister, close the uffd and the file mapping."""
        if self._stats.time_to_complete_s is None:
            self._stats.time_to_complete_s = time.perf_counter() - self._t0
        self._teardown_uffd()
        for m in self._mappings.values():
            if self._server_mode == "process":
                m.madvise(ioctl.MADV_DOFORK)

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
        _fence(self._regions, claims, uffd)

    def _teardown_uffd(self) -> None:
        uffd = self._uffd
        if uffd is not None and not uffd.closed:
            if self._registered:
                for m in self._mappings.values():
                    uffd.unregister(m.address, m.length)
                self._registered = False
            uffd.close()
        if self._file_map is not None:
            self._file_map.close()
        if self._file_fd >= 0:
            os.close(self._file_fd)
            self._file_fd = -1
        if self._server is not None:
            self._server.close_buffers()
        with self._fd_lock:
            if self._wake_fd >= 0:
                if self._server is not None:
                    self._server.wake_fd = -1
                os.close(self._wake_fd)
                self._wake_fd = -1

    # -- public
    @property
    def server(self) -> str:
        """``"thread"``, ``"process"`` or ``"interpreter"``."""
        return self._server_mode

    @property
    def complete(self) -> bool:
        """True once every page is placed and the uffd is closed."""
        return self._done.is_set() and not self._failed and self._stats.time_to_complete_s is not None

    def progress(self) -> Tuple[int, int]:
        """``(placed_pages, total_pages)`` right now."""
        claims = self._claims
        if claims is None:
            return (0, 0)
        total = claims.total_pages
        if self._server_mode == "thread":
            return (claims.placed_pages, total)
        if self._done.is_set() or self._closed:
            return (self._stats.placed_pages, total)
        if self._server_mode == "process" and self._progress is not None:
            (placed,) = struct.unpack_from("=Q", self._progress, 0)
            return (placed, total)
        return (claims.placed_count(), total)

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
        server = self._server
        if server is not None and self._server_mode == "thread":
            server.merged_stats(self._stats)
        return self._stats

    def close(self, *, _raise: bool = True) -> None:
        """Stop loading, unregister and unmap everything (idempotent, safe mid-load).

        Raises:
            LoaderError: a worker had failed and ``wait()`` has not reported it yet.
        """
        if self._closed:
            return
        self._closed = True
        server = self._server
        if server is not None:
            if self._server_mode == "thread":
                if not server.ended.is_set():
                    server.stop()
                if server.running:            # else nothing will ever set _done
                    self._done.wait(30.0)
                # join: a thread never joined keeps its stack mapped until its
                # handle is collected (Python 3.13)
                for t in server.threads:
                    if t is not threading.current_thread() and t.ident is not None:
                        t.join(30.0)
                server.merged_stats(self._stats)
            elif self._child_pid:
                server.stop()
                self._reap_child(timeout=5.0)
        if self._host is not None:
            self._stop_interpreter_server()
            _live_interpreter_loaders.discard(self)
            if self._host.is_alive():
                # Stuck: it may still use the uffd, the file mapping, the
                # claims and the memory.  Leak them rather than pull them away.
                self._fail(LoaderError("the interpreter server did not stop within 30 s"))
                self._closed = True
                if _raise:
                    self._raise_error()
                return
        if self._monitor is not None:
            self._monitor.join(timeout=30.0)
        if self._registered:                      # closed before completion
            # Unregistering wakes the waiters, which would then fault in zero
            # pages: nothing may read a page that was never served as zeros.
            for m in self._mappings.values():
                _protect_none(m.address, m.length)
            self._registered = False
        self._teardown_uffd()
        if self._result_fd >= 0:
            os.close(self._result_fd)
            self._result_fd = -1
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._claims is not None:
            self._claims.close()
        self._unmap_blocks()
        if self._owns_source and self._source is not None:
            self._source.close()
        if _raise and not self._error_reported:
            self._raise_error()

    def _reap_child(self, timeout: float) -> None:
        """Wait for the server to leave after a stop request; kill it if it does not."""
        deadline = time.monotonic() + timeout
        assert self._monitor is not None
        self._monitor.join(max(0.0, deadline - time.monotonic()))
        if self._monitor.is_alive() and self._child_pid:
            try:
                os.kill(self._child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _protect_none(start: int, length: int) -> None:
    """Replace ``[start, start+length)`` by inaccessible memory (no longer registered)."""
    ioctl.libc.mmap(start, length, ioctl.PROT_NONE,
                    ioctl.MAP_PRIVATE | ioctl.MAP_ANONYMOUS | ioctl.MAP_FIXED
                    | ioctl.MAP_NORESERVE, -1, 0)


def _fence(regions: Sequence[_Region], claims: ClaimMap, uffd: Userfaultfd) -> None:
    """Make every unplaced page inaccessible, then wake its waiters (see ``_fence_unplaced``)."""
    for region in regions:
        for first, end in claims.unplaced_runs(region.index):
            start = region.start + first * region.unit
            length = (end - first) * region.unit
            _protect_none(start, length)
            uffd.wake(start, length)


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


def _child_main(server: _Server, result_fd: int, progress: mmap.mmap, parent: int) -> None:
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
            struct.pack_into("=Q", progress, 0, server.claims.placed_pages)
        if server.error is not None:
            raise server.error
        stats = server.merged_stats(Stats()).as_dict()
        report = {"complete": complete.is_set(), "stopped": not complete.is_set(),
                  "stats": stats}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        code = 1
        report = {"error": _describe_error(exc), "traceback": traceback.format_exc()}
    try:
        struct.pack_into("=Q", progress, 0, server.claims.placed_pages)
        data = json.dumps(report).encode() + b"\n"     # one line: the parent acts on it
        while data:
            data = data[os.write(result_fd, data):]
    finally:
        os._exit(code)


def _describe_error(exc: BaseException) -> str:
    """A server's failure in one line for its report (a LoaderError says it all itself)."""
    return str(exc) if isinstance(exc, LoaderError) else f"{type(exc).__name__}: {exc}"


def _read_report(fd: int) -> Dict[str, Any]:
    """A server's one-line JSON report from pipe ``fd`` ({} if none came before EOF)."""
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

_INTERPRETER_CODE = ("import uffdpy.loader\n"
                     "uffdpy.loader._interpreter_main(spec, bitmaps)\n"
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
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = tuple([package_parent] + [p for p in sys.path if p != package_parent])
    try:
        excinfo = interps.exec(interp, "import sys\nsys.path[:] = paths\n"
                               "import uffdpy.loader\ndel paths\n", shared={"paths": paths})
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


class _SharedRegion:
    """A region as an interpreter server receives it: the numbers and the bitmap."""

    def __init__(self, fields: Dict[str, Any], bitmap: bytes) -> None:
        self.name: str = fields["name"]
        self.length: int = fields["length"]
        self.page_size: int = fields["page_size"]
        self.pages: int = fields["pages"]
        self.file_offset: int = fields["file_offset"]
        self.file_bytes: int = fields["file_bytes"]
        self.bitmap = bitmap

    def runs(self) -> Iterator[Tuple[int, int, bool]]:
        return bitmap_runs(self.bitmap, self.pages)


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
    server: Optional[_Server] = None
    regions: List[_Region] = []
    report: Dict[str, Any]
    try:
        uffd = Userfaultfd.from_fd(os.dup(spec["uffd"]), created_via="interpreter")
        regions = [_Region(i, _SharedRegion(fields, bitmaps[i]), fields["start"],
                           spec["file_map"], spec["unit"])
                   for i, fields in enumerate(spec["regions"])]
        claims = ClaimMap.attach(spec["claims"], [r.units for r in regions])
        server = _Server(uffd, regions, claims, spec["wake"], daemon_threads=False,
                         file_fd=spec["file_fd"], path=spec["path"], **spec["options"])
        server.go.set()
        server.start()
        _signal_fd(spec["started"])
        for t in server.threads:              # the loop thread joins the others last
            t.join()
        if server.error is not None:
            raise server.error
        complete = claims.complete.is_set()
        report = {"complete": complete, "stopped": not complete,
                  "stats": server.merged_stats(Stats()).as_dict()}
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
