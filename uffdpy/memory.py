"""Memory the package owns: mmap'd ranges with an address, a length and a close().

A :class:`Mapping` is the unit a userfaultfd registers: private anonymous
memory to be filled with ``UFFDIO_COPY`` (MISSING mode), or a shared file or
memfd mapping whose page cache is filled directly and mapped with
``UFFDIO_CONTINUE`` (MINOR mode).  Addresses are plain ints, lengths are in
bytes.

A :meth:`Mapping.view` is a memoryview straight onto the mapped pages.  It
does not keep the mapping alive, so :meth:`Mapping.close` first releases every
view of the mapping, the slices and casts made from them included (they share
one exporter, found through the garbage collector): using one afterwards
raises ``ValueError: operation forbidden on released memoryview object``
instead of touching unmapped memory.  A view that cannot be released because
something holds a buffer export of it (``BufferError``: a ``PickleBuffer``, a
syscall in progress in another thread) keeps the memory mapped: it is then
left to its holders (leaked), never pulled away under them.  Objects that
keep a view's raw address without an export (``ctypes.c_char.from_buffer``,
``numpy.frombuffer``) are not covered: copy their bytes out before close.
Touching *registered* memory through
a view holds the GIL while the thread is parked; see :mod:`uffdpy.uffd`.
"""
from __future__ import annotations

import ctypes
import gc
import mmap as _mmap
import os
from typing import Any, Iterable, Optional

from . import ioctl as _abi
from .sizes import round_up

__all__ = ["PAGE_SIZE", "HUGE_PAGE_SIZE", "Mapping", "memfd_create", "release_views"]

PAGE_SIZE: int = _mmap.PAGESIZE
HUGE_PAGE_SIZE: int = 2 * 1024 * 1024


class Mapping:
    """An owned ``mmap`` region: ``address`` and ``length`` in bytes; idempotent :meth:`close`.

    Build one with :meth:`anonymous` or :meth:`of_file`.  A context manager.
    """

    address = 0
    length = 0
    writable = False
    _owned = False

    def __init__(self, address: int, length: int, *, writable: bool, owned: bool = True) -> None:
        """Wrap ``length`` bytes already mapped at ``address``; ``owned`` means close() unmaps."""
        self.address = address
        self.length = length
        self.writable = writable
        self._owned = owned
        #: the one exporter of every view handed out (see ``release_views``)
        self._array: Optional[Any] = None
        #: a view could not be released at close: the memory was left mapped
        self.leaked = False

    @classmethod
    def anonymous(cls, length: int, *, align: int = PAGE_SIZE, huge_pages: bool = False,
                  noreserve: bool = True, populate: bool = False) -> "Mapping":
        """Map ``length`` bytes of private anonymous read-write memory aligned to ``align`` bytes.

        ``length`` must be a multiple of the page size (of ``HUGE_PAGE_SIZE``
        with ``huge_pages``, which maps hugetlbfs pages with ``MAP_HUGETLB`` and
        aligns to at least 2 MiB).  Alignment beyond the page size is obtained
        by over-mapping and trimming.  ``noreserve`` adds ``MAP_NORESERVE`` (no
        swap accounting), ``populate`` adds ``MAP_POPULATE`` (prefault: never
        on memory you will register in MISSING mode).

        Raises:
            ValueError: bad length or alignment.
            OSError: mmap failed (ENOMEM with huge_pages: reserve pages in
                /proc/sys/vm/nr_hugepages).
        """
        page = HUGE_PAGE_SIZE if huge_pages else PAGE_SIZE
        if length <= 0 or length % page:
            raise ValueError(f"length {length:#x} must be a positive multiple of {page:#x} bytes")
        if align <= 0 or align & (align - 1) or align % PAGE_SIZE:
            raise ValueError(f"align {align:#x} must be a power of two multiple of "
                             f"the page size {PAGE_SIZE:#x}")
        align = max(align, page)
        flags = _abi.MAP_PRIVATE | _abi.MAP_ANONYMOUS
        if noreserve and not huge_pages:
            # A hugetlb mapping without reservation is SIGBUS at first touch
            # when the pool is empty; with it, mmap fails up front (ENOMEM).
            flags |= _abi.MAP_NORESERVE
        if populate:
            flags |= _abi.MAP_POPULATE
        if huge_pages:
            flags |= _abi.MAP_HUGETLB | _abi.MAP_HUGE_2MB
        prot = _abi.PROT_READ | _abi.PROT_WRITE
        libc = _abi.libc
        # mmap returns page-aligned (huge-page-aligned for MAP_HUGETLB) memory,
        # so only a larger alignment needs the over-map-and-trim dance.
        extra = align - page
        if extra == 0:
            return cls(libc.mmap(None, length, prot, flags, -1, 0), length, writable=True)
        base = libc.mmap(None, length + extra, prot, flags, -1, 0)
        start = round_up(base, align)
        if start > base:
            libc.munmap(base, start - base)
        tail = base + length + extra - (start + length)
        if tail:
            libc.munmap(start + length, tail)
        return cls(start, length, writable=True)

    @classmethod
    def of_file(cls, fd: int, length: int, *, offset: int = 0, writable: bool = False,
                shared: bool = True, populate: bool = False) -> "Mapping":
        """Map ``length`` bytes of the file ``fd`` from byte ``offset`` (page-aligned).

        ``shared`` maps ``MAP_SHARED`` (writes reach the file; needed for MINOR
        mode), else ``MAP_PRIVATE`` (copy on write).  ``writable`` adds
        ``PROT_WRITE`` (a shared writable map needs ``fd`` opened read-write).

        Raises:
            ValueError: bad length or offset.
            OSError: mmap failed (EACCES: fd mode does not allow the mapping).
        """
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"offset {offset:#x} must be a non-negative multiple of "
                             f"the page size {PAGE_SIZE:#x}")
        prot = _abi.PROT_READ | (_abi.PROT_WRITE if writable else 0)
        flags = _abi.MAP_SHARED if shared else _abi.MAP_PRIVATE
        if populate:
            flags |= _abi.MAP_POPULATE
        address = _abi.libc.mmap(None, length, prot, flags, fd, offset)
        return cls(address, length, writable=writable)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.address:#x}+{self.length:#x}"
        return f"<Mapping {state}{' rw' if self.writable else ' ro'}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self.length == 0

    def view(self) -> memoryview:
        """A 1-D ``'B'`` memoryview over the whole mapping (read-only unless writable).

        :meth:`close` releases it (and every slice of it): using it after
        that raises ``ValueError`` (see the module docstring).

        Raises:
            ValueError: the mapping is closed.
        """
        if self.closed:
            raise ValueError("view() of a closed Mapping")
        if self._array is None:
            self._array = (ctypes.c_ubyte * self.length).from_address(self.address)
        view = memoryview(self._array).cast("B")
        return view if self.writable else view.toreadonly()

    def madvise(self, advice: int, offset: int = 0, length: Optional[int] = None) -> None:
        """``madvise(address + offset, length, advice)``; ``length`` defaults to the rest.

        ``advice`` is an ``MADV_*`` constant from :mod:`uffdpy.ioctl`; offsets
        and lengths are bytes (``offset`` page-aligned).

        Raises:
            ValueError: the range is outside the mapping, or it is closed.
            OSError: madvise failed (EINVAL: unsupported advice for this memory).
        """
        if length is None:
            length = self.length - offset
        if self.closed or offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"madvise range {offset:#x}+{length:#x} outside {self!r}")
        _abi.libc.madvise(self.address + offset, length, advice)

    def close(self) -> None:
        """Release every view (``release_views``), then unmap (if owned); safe to call twice.

        A view that cannot be released leaves the memory mapped (``leaked``).

        Raises:
            OSError: munmap failed (the mapping is then forgotten anyway).
        """
        release_views([self])
        address, length = self.address, self.length
        self.address = self.length = 0
        if length and self._owned and not self.leaked:
            _abi.libc.munmap(address, length)

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def release_views(mappings: Iterable[Mapping]) -> None:
    """Release every live view of ``mappings`` (slices and casts of them too), in one scan.

    The views of a mapping share one exporter (a ctypes array over its
    pages); the garbage collector lists every memoryview, and those whose
    ``obj`` is one of these exporters are released, so that using them
    raises ``ValueError`` rather than touching memory about to be unmapped.
    A view with buffers of its own exported (``BufferError`` on release)
    marks its mapping ``leaked``: :meth:`Mapping.close` then leaves the memory
    mapped for its holders.  One scan of the collector's objects, only when
    some mapping handed out views.
    """
    owners = {id(m._array): m for m in mappings if m._array is not None}
    if not owners:
        return
    for obj in gc.get_objects():
        if type(obj) is not memoryview:
            continue
        try:
            owner = owners.get(id(obj.obj))
        except ValueError:                      # released already
            continue
        if owner is None:
            continue
        try:
            obj.release()
        except BufferError:                     # a buffer of it is held: keep the memory
            owner.leaked = True
    for m in owners.values():
        m._array = None


def memfd_create(name: str, flags: int = 0) -> int:
    """An anonymous memory file (``memfd_create(2)``); returns its fd, which you own.

    ``flags`` are ``MFD_*`` from :mod:`uffdpy.ioctl`.  ``MFD_CLOEXEC`` is always
    added, like every fd Python creates (PEP 446); use ``os.set_inheritable``
    to pass the fd on through exec.

    Raises:
        OSError: memfd_create failed (EINVAL: bad flags or name too long).
    """
    return _abi.libc.memfd_create(os.fsencode(name), flags | _abi.MFD_CLOEXEC)
