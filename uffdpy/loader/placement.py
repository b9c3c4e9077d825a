"""Copying pages into the registered memory, and fencing the pages never placed.

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

Here: the page kinds, ``Region`` (a region as the workers see it), the
``Placer`` half of a worker (``place``: a run of one kind with as few
ioctls as possible), and the fail-closed helpers (``fence``: ``PROT_NONE``
over what nobody placed, then ``UFFDIO_WAKE``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

from .. import ioctl
from ..memory import PAGE_SIZE, Mapping
from ..pagesource import PageRegion, bitmap_runs, bitmap_runs_in, count_bits
from ..uffd import Filler, UffdError, Userfaultfd
from .claims import ClaimMap
from .errors import LoaderError
from .stats import WorkerCounters

__all__ = ["ZERO", "DIRECT", "BOUNCE", "Placer", "Region", "SharedRegion", "fence", "protect_none"]

#: How a page is placed: ZEROPAGE, COPY straight from the file mapping, or
#: COPY from a bounce buffer (the bytes are not page-aligned in the file, or
#: the page is only partly in the file and the rest must read as zeros).
ZERO, DIRECT, BOUNCE = 0, 1, 2


_KIND_RUN = re.compile(rb"\x00+|\x01+|\x02+")


class Region:
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

    def __init__(self, index: int, region: Union[PageRegion, "SharedRegion"], start: int,
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



class SharedRegion:
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



class Placer:
    """The placing half of a worker (``workers.Workers``): runs of pages into guest memory.

    The worker provides the claim map, the zero source (hugetlbfs) and the
    image file (for the bounce buffers).
    """

    claims: ClaimMap
    zero_source: Optional[Mapping]
    file_fd: int
    path: str

    def place(self, region: Region, first: int, end: int, kind: int,
               counters: WorkerCounters, bounce: Optional[Mapping],
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

    def _copy_failed(self, region: Region, unit: int, kind: int,
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


def protect_none(start: int, length: int) -> None:
    """Replace ``[start, start+length)`` by inaccessible memory (no longer registered)."""
    ioctl.libc.mmap(start, length, ioctl.PROT_NONE,
                    ioctl.MAP_PRIVATE | ioctl.MAP_ANONYMOUS | ioctl.MAP_FIXED
                    | ioctl.MAP_NORESERVE, -1, 0)


def fence(regions: Sequence[Region], claims: ClaimMap, uffd: Userfaultfd) -> None:
    """Make every unplaced page inaccessible, then wake its waiters (see ``_fence_unplaced``)."""
    for region in regions:
        for first, end in claims.unplaced_runs(region.index):
            start = region.start + first * region.unit
            length = (end - first) * region.unit
            protect_none(start, length)
            uffd.wake(start, length)


# the names these had when the loader was one module (re-exported by the package)
_Region, _SharedRegion, _fence, _protect_none = Region, SharedRegion, fence, protect_none
