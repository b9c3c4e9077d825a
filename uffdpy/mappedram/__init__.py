"""Reader and writer for QEMU "mapped-ram" migration files (pure file format code).

A mapped-ram file is what ``migrate file:PATH`` writes when the ``mapped-ram``
migration capability is on (QEMU 9.0 and later).  Unlike the classic stream,
guest pages are not interleaved with the stream: every RAMBlock gets a fixed
region in the file where page *i* lives at ``pages_offset + i * page_size``,
and a bitmap saying which pages were written.  That is what makes lazy loading
possible: any page can be found without reading anything else.

Some facts about the format this module relies on (QEMU 10.0, x86_64 host;
see ``shared/reference/mapped-ram-format.md`` for the byte-by-byte layout):

* The stream is big-endian everywhere except the per-block bitmap, which is the
  host's ``unsigned long`` array written raw.  On the little-endian 64-bit
  hosts QEMU runs on (x86_64, aarch64), page *i* is present iff
  ``bitmap[i >> 3] >> (i & 7) & 1`` and the bitmap is ``ceil(pages / 64) * 8``
  bytes.  Files written on big-endian or 32-bit hosts are not supported.
* A clear bit means the page is zero: QEMU never writes zero pages, so the
  pages region is sparse.  A set bit means the page's bytes are in the file.
  Bytes under a clear bit may be stale (a live migration can clear a bit
  without erasing the data); readers must always consult the bitmap.
* All offsets in a MappedRamHeader are absolute file offsets, also when the
  stream starts at ``file:PATH,offset=N``.
* The device state that follows the RAM sections is not self-delimiting; the
  vmdesc JSON trailer lists the device sections in file order, which is how
  this module splits it without knowing any device's layout.

Everything read from the file is checked before a :class:`Snapshot` is
returned; every failure is a :class:`MappedRamError` naming the file, the
offset and what was expected.  Opening a snapshot reads headers, bitmaps and
the device state only, never the pages region.

This module imports nothing kernel-facing; it works on any OS.

The package: :mod:`.model` (the format's constants, errors, :class:`RamBlock`,
:class:`DeviceSection`), :mod:`.parse` (the checks of every byte read),
:mod:`.snapshot` (:class:`Snapshot`, :func:`backend_blocks`) and :mod:`.write`
(:func:`write_snapshot`, :func:`rewrite_snapshot`, imported on first use);
every name is here too.
"""
from __future__ import annotations

from .model import (MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HDR_VERSION,
                    MAPPED_RAM_HEADER_SIZE, RAM_SECTION_IDSTR, TARGET_PAGE_BITS_DEFAULT,
                    TARGET_PAGE_SIZE, DeviceSection, MappedRamError, NotMappedRamError, RamBlock)
from .snapshot import MACHINE_RAM_IDS, Snapshot, backend_blocks
from .._lazy import lazy_exports

__all__ = [
    "MappedRamError", "NotMappedRamError", "DeviceSection", "RamBlock", "Snapshot",
    "BlockSpec", "write_snapshot", "rewrite_snapshot", "backend_blocks", "MACHINE_RAM_IDS",
    "TARGET_PAGE_SIZE", "TARGET_PAGE_BITS_DEFAULT", "MAPPED_RAM_HDR_VERSION",
    "MAPPED_RAM_HEADER_SIZE", "MAPPED_RAM_FILE_OFFSET_ALIGNMENT", "RAM_SECTION_IDSTR",
]

#: the writer is imported on first use: reading a snapshot (resume, inspect) needs none of it
__getattr__, __dir__ = lazy_exports(__name__, {"BlockSpec": "write", "write_snapshot": "write",
                                               "rewrite_snapshot": "write"}, globals())
