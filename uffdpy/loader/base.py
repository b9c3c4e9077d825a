"""What both loaders share: one anonymous mapping per region, ``memory()``, ``stats``."""
from __future__ import annotations

import errno
import os
from typing import Dict, List, Optional, Tuple, TypeVar, Union

from .. import ioctl
from ..memory import HUGE_PAGE_SIZE, PAGE_SIZE, Mapping, release_views
from ..pagesource import PageSource, RegionNotFound, check_fits_in_memory, open_image
from ..sizes import MiB, round_up
from .stats import Stats

#: Memory for each block is aligned like this (THP-friendly, as QEMU does).
BLOCK_ALIGN = 2 * MiB

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
            raise RegionNotFound(f"no region named {name!r}; regions: "
                                 f"{', '.join(self._order)}") from None

    def _map_blocks(self, *, transparent_huge_pages: bool) -> None:
        check_fits_in_memory(self.source)          # an absurd declaration, before any mmap
        for block in self.source.regions:
            length = round_up(block.length, PAGE_SIZE)
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
        check_fits_in_memory(self.source)
        need = sum(-(-r.length // HUGE_PAGE_SIZE) for r in self.source.regions)
        for region in self.source.regions:
            length = max(round_up(region.length, HUGE_PAGE_SIZE), HUGE_PAGE_SIZE)
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

    def progress(self) -> Tuple[int, int]:  # pragma: no cover - overridden
        """``(placed_pages, total_pages)`` right now."""
        raise NotImplementedError

    @property
    def stats(self) -> Stats:
        """Load statistics (see ``Stats``)."""
        return self._stats

