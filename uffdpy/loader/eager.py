"""``EagerLoader``: the QEMU 10 way, as a baseline (read everything, then return)."""
from __future__ import annotations

import errno
import os
import time
from typing import Optional, Tuple

from .base import MiB, SnapshotLike, _LoaderBase, _open_source

__all__ = ["EagerLoader"]

#: At most this many bytes per ``pread`` in the eager loader (QEMU 10's value).
EAGER_READ_BYTES = 1 * MiB


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
            # the file the source validated, not whatever now has its name
            self._read_all(self.source.fileno())
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

    def progress(self) -> Tuple[int, int]:
        """``(total_pages, total_pages)``: every page is in once the constructor returns."""
        return (self._stats.total_pages, self._stats.total_pages)

    def close(self, *, _raise: bool = True) -> None:
        """Unmap the memory and close the snapshot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._unmap_blocks()
        if self._owns_source and self._source is not None:
            self._source.close()
