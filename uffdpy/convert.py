"""Turn a memory dump into a mapped-ram snapshot (pure file-format code).

``uffdpy convert DUMP.elf -o SNAP`` makes a guest memory dump (QEMU's
``dump-guest-memory``) explorable with every mapped-ram tool, and loadable by
QEMU itself:

* ``layout="ram"`` (the default) writes one block named ``ram`` covering
  guest-physical address 0 up to the end of the highest segment, rounded up to
  a MiB, each segment's bytes at their guest-physical address and the holes
  between segments as zero pages.  That is exactly what QEMU's ``-machine
  none -m SIZE`` has, so ``qemu-system-x86_64 -machine none -m SIZE
  -incoming defer`` plus ``migrate-incoming file:SNAP`` (mapped-ram on) loads
  it, and ``pmemsave`` then shows the dump's bytes at their addresses.
* ``layout="regions"`` writes one block per segment, named as the segment is
  (see :mod:`uffdpy.elfcore`): for process cores and for looking at a dump
  with ``inspect``/``load``/``dump``; QEMU has no machine with such blocks.

Only pages that hold data are written (the file is sparse, as QEMU's own).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from .elfcore import ElfImage
from .mappedram import BlockSpec, Snapshot, write_snapshot
from .pagesource import ImageError, PageRegion, PathLike, memory_limit, memory_limit_origin
from .sizes import MiB

__all__ = ["ConvertedBlock", "to_mapped_ram"]

#: Pages read and written per piece while streaming.
_PIECE_PAGES = 256




@dataclass(frozen=True)
class ConvertedBlock:
    """One block written by :func:`to_mapped_ram`; ``data_pages`` were written (not all zero)."""

    name: str
    length: int
    data_pages: int


def _pieces(region: PageRegion, first_out_page: int) -> Iterator[Tuple[int, bytes]]:
    """``(block page, bytes)`` pieces of a region's pages that hold data, in order."""
    for first, count, present in region.runs():
        if not present:
            continue
        for lo in range(first, first + count, _PIECE_PAGES):
            n = min(_PIECE_PAGES, first + count - lo)
            yield first_out_page + lo, region.read_pages(lo, n)


def to_mapped_ram(image: ElfImage, path: PathLike, *, layout: str = "ram",
                  ram_size: int = 0, max_ram_bytes: Optional[int] = None) -> List[ConvertedBlock]:
    """Write ``image`` (an open ELF memory image) to ``path`` as a mapped-ram snapshot.

    ``ram_size`` (layout ``ram`` only) sets the block length; 0 means the end
    of the highest segment rounded up to a MiB.  The RAM written (all blocks
    together) may be at most ``max_ram_bytes``, by default this machine's
    memory (``pagesource.memory_limit()``, which ``$UFFDPY_MAX_MEMORY`` raises,
    as for the loaders): a segment at an absurd physical
    address is refused before anything is allocated or written.  ``path`` is
    written under a temporary name and renamed at the end: a failure leaves
    no output.

    Returns the blocks written.

    Raises:
        ImageError: the layout does not fit the image (a process core has
            virtual addresses; a segment not page-aligned in guest-physical
            memory; ``ram_size`` too small; more RAM than ``max_ram_bytes``).
        ValueError: a bad ``layout``; ``path`` is the image itself.
        OSError: writing failed.
    """
    regions = image.regions
    page_size = 4096
    limit = memory_limit() if max_ram_bytes is None else max_ram_bytes
    where = ("the given maximum" if max_ram_bytes is not None else
             memory_limit_origin() or "this machine's memory")
    out = os.fspath(path)
    if os.path.exists(out) and os.path.samefile(out, image.path):
        raise ValueError(f"{out}: the output is the input file {image.path}; "
                         "write to another name")
    if layout == "regions":
        total = sum(r.length for r in regions)
        if total > limit:
            raise ImageError(image.path, None, "RAM of the converted snapshot (all segments)",
                             f"at most {limit:#x} bytes, {where}",
                             f"{total:#x} bytes", hint="a snapshot this large cannot be "
                             "loaded here; use --layout ram with --ram-size")
        write_snapshot(path, [BlockSpec(r.name, r.length, _pieces(r, 0)) for r in regions],
                       page_size=page_size)
        return _written(path)
    if layout != "ram":
        raise ValueError(f"layout must be 'ram' or 'regions', not {layout!r}")
    if image.address_space != "guest-physical":
        raise ImageError(image.path, None, "a single 'ram' block needs guest-physical addresses",
                         "a QEMU dump-guest-memory file", f"{image.address_space} addresses",
                         hint="use --layout regions for a process core")
    by_address = sorted(regions, key=lambda r: r.address)
    for r in by_address:
        if r.address % page_size:
            raise ImageError(image.path, None, f"segment {r.name} is not page-aligned",
                             f"a multiple of {page_size}", hex(r.address))
    end = max((r.address + r.length for r in by_address), default=0)
    length = ram_size or (end + MiB - 1) // MiB * MiB
    if length < end or length % page_size:
        raise ImageError(image.path, None, "RAM size for the converted snapshot",
                         f"a multiple of {page_size} of at least {end:#x}", hex(length))
    if length > limit:
        highest = max(by_address, key=lambda r: r.address + r.length)
        raise ImageError(image.path, None, "RAM size for the converted snapshot",
                         f"at most {limit:#x} bytes, {where}", hex(length),
                         hint=f"segment {highest.name} ends at {end:#x}; "
                         + ("pass a smaller --ram-size" if ram_size and end <= limit else
                            "--layout regions writes one block per segment instead"))

    def chunks() -> Iterator[Tuple[int, bytes]]:
        for r in by_address:
            yield from _pieces(r, r.address // page_size)

    write_snapshot(path, [BlockSpec("ram", length, chunks())], page_size=page_size)
    return _written(path)


def _written(path: PathLike) -> List[ConvertedBlock]:
    with Snapshot.open(path) as snap:
        return [ConvertedBlock(b.name, b.length, b.present_pages) for b in snap.blocks]
