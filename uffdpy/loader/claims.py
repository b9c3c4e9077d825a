"""The claim map: which worker places each page, and which pages are placed.

The fault loop and the prefetcher race for pages; the claim map decides
every race.  One byte per page, ``UNCLAIMED`` -> ``CLAIMED`` -> ``PLACED``,
with the claim taken under a lock (for the common fault, one unclaimed
4 KiB page, claim, ioctl and mark happen in one hold of it: see
``workers.Workers._serve``).  Whoever claims a page places it; the other
side leaves it alone.  Shared between processes or interpreters, it also
tells the loader which pages a dead server had placed.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

__all__ = ["ClaimMap", "UNCLAIMED", "CLAIMED", "PLACED"]

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
            # a fresh anonymous mapping is zero (UNCLAIMED) without being
            # written: ready does not grow with the guest's size, as a
            # bytearray's memset (4 MiB at 16 GiB) made it
            self._buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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

    def publish(self, values: Sequence[int]) -> None:
        """Write ``values`` as u64s at the start of the header (a server's live counters).

        Another view of a shared map (the loader) reads them with ``published``.
        """
        if len(values) * 8 > self.HEADER_BYTES:
            raise ValueError(f"{len(values)} counters do not fit in {self.HEADER_BYTES} bytes")
        struct.pack_into(f"={len(values)}Q", self._buf, 0, *values)

    def published(self, count: int) -> Tuple[int, ...]:
        """The first ``count`` u64s of the header, as the last ``publish`` left them."""
        return struct.unpack_from(f"={count}Q", self._buf, 0)

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

    def place_one(self, block: int, page: int, place: Callable[..., int], *args: Any) -> int:
        """Claim, place and mark one unclaimed page under one hold of the lock.

        ``place(*args)`` is the ioctl (one ``UFFDIO_COPY`` or ``ZEROPAGE`` of
        the page: a few µs, the only call made with the lock held); the page
        is ``PLACED`` when it returns ``expect`` (its length, the last of
        ``args``).  Returns what ``place`` returned, or -1 without calling it
        when the page was not unclaimed (the caller takes the general path).
        The fault loop's common case: one acquisition instead of two, and no
        state visible between the claim and the mark.
        """
        st = self._state[block]
        last = False
        with self._lock:
            if st[page] != UNCLAIMED:
                return -1
            done = place(*args)
            if done == args[-1]:
                st[page] = PLACED
                self.placed_pages += 1
                last = self.placed_pages == self.total_pages
        if last:
            self.completed()
        return done

    def completed(self) -> None:
        """Every page is placed: set ``complete`` and tell the owner (``on_complete``)."""
        self.complete.set()
        if self._on_complete is not None:
            self._on_complete()

    def set_on_complete(self, callback: Optional[Callable[[], None]]) -> None:
        """Call ``callback`` (from the placing thread) when the last page is placed."""
        self._on_complete = callback

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
