"""The mapped-ram format's constants, errors and model: :class:`RamBlock`, :class:`DeviceSection`."""
from __future__ import annotations

import struct
from typing import Callable, Iterator, Optional, Tuple

from ..migstream import MigCmd, QEMU_VM_SECTION_FOOTER
from ..pagesource import POPCOUNT, ImageError, ImageFile, RegionBase, bitmap_runs, bitmap_runs_in
from ..record import Record


# --- the stream's vocabulary is migstream's; mapped-ram's own constants follow ---

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28          # be32 version, be64 page_size, bitmap_offset, pages_offset
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
TARGET_PAGE_BITS_DEFAULT = 12        # x86
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS_DEFAULT   # MappedRamHeader.page_size, bytes per bit
RAM_SECTION_IDSTR = "ram"

_CONFIG_SUBSECTION_PREFIX = b"configuration"
_MAX_TAIL_BYTES = 256 << 20          # device state + vmdesc larger than this is absurd

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">IQQQ")

MIG_CMD_SWITCHOVER_START = int(MigCmd.SWITCHOVER_START)


# --- errors ----------------------------------------------------------------------

class MappedRamError(ImageError):
    """A mapped-ram file is malformed, or is not a mapped-ram file.

    Attributes (from :class:`~uffdpy.pagesource.ImageError`): ``path``,
    ``offset`` (absolute file offset of the offending bytes, or None),
    ``what``, ``expected``, ``actual``, ``hint``.
    """


class NotMappedRamError(MappedRamError):
    """The file is a QEMU migration stream saved without the mapped-ram capability."""


_NOT_MAPPED_RAM_HINT = (
    "this stream was saved without the mapped-ram capability; save it again with "
    "'migrate-set-capabilities' {\"capability\": \"mapped-ram\", \"state\": true} "
    "(HMP: migrate_set_capability mapped-ram on) before 'migrate file:PATH'")


# --- low-level reading -------------------------------------------------------------

class _Source(ImageFile):
    """An open file read with pread; every read is exact or raises MappedRamError."""

    error = MappedRamError
    noun = "snapshot"


class _Cursor:
    """Sequential big-endian reads from a _Source, tracking the position."""

    def __init__(self, src: _Source, pos: int) -> None:
        self.src = src
        self.pos = pos

    def error(self, what: str, expected: object = None, actual: object = None,
              offset: Optional[int] = None) -> MappedRamError:
        return MappedRamError(self.src.path, self.pos if offset is None else offset,
                              what, expected, actual)

    def take(self, count: int, what: str) -> bytes:
        data = self.src.read_exact(self.pos, count, what)
        self.pos += count
        return data

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return int(_BE16.unpack(self.take(2, what))[0])

    def be32(self, what: str) -> int:
        return int(_BE32.unpack(self.take(4, what))[0])

    def be64(self, what: str) -> int:
        return int(_BE64.unpack(self.take(8, what))[0])

    def counted_string(self, what: str) -> str:
        start = self.pos
        n = self.u8(what + " length")
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MappedRamError(self.src.path, start + 1, f"{what} is not ASCII",
                                 "an ASCII name", repr(raw)) from None

    def expect(self, read: Callable[[str], int], value: int, what: str, *,
               problem: Optional[str] = None, shown: Optional[str] = None,
               digits: int = 0) -> None:
        """Read one value with ``read`` (``self.u8``, ``self.be32``...) and refuse any
        other than ``value``: ``problem`` (default ``what``) at its offset, the
        expected value as ``shown`` (default: hex of ``digits`` digits, or decimal)."""
        at = self.pos
        got = read(what)
        if got != value:
            def show(v: int) -> object:
                return f"{v:#0{digits + 2}x}" if digits else v
            raise MappedRamError(self.src.path, at, problem or what,
                                 shown or show(value), show(got))

    def expect_u8(self, value: int, what: str) -> None:
        self.expect(self.u8, value, what, digits=2)

    def footer(self, section_id: int, what: str) -> None:
        at = self.pos
        self.expect_u8(QEMU_VM_SECTION_FOOTER, f"section footer of {what}")
        got = self.be32(f"section footer id of {what}")
        if got != section_id:
            raise MappedRamError(self.src.path, at + 1, f"section footer id of {what}",
                                 section_id, got)


# --- bit helpers --------------------------------------------------------------------



def _bitmap_size(pages: int) -> int:
    """Bytes of a bitmap of ``pages`` bits as QEMU writes it (64-bit unsigned longs)."""
    return (pages + 63) // 64 * 8


def _clear_bit(bitmap: bytearray, i: int) -> None:
    bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF


# --- model --------------------------------------------------------------------------

class DeviceSection(Record, frozen=True):
    """One QEMU_VM_SECTION_FULL device section.

    ``offset``/``length`` are the absolute byte range of the whole section,
    including its header and footer.
    """

    name: str
    instance: int
    version: int
    section_id: int
    offset: int
    length: int


class RamBlock(RegionBase):
    """One RAMBlock of a mapped-ram snapshot.

    ``length`` is the block's used length in bytes, ``page_size`` the bitmap
    granularity in bytes (4096 on x86), ``pages`` the page count.
    ``bitmap`` is the raw bitmap as stored in the file: host-native unsigned
    long words, which on the little-endian 64-bit hosts QEMU runs on means page
    *i* is present iff ``bitmap[i >> 3] >> (i & 7) & 1``.  Bits past ``pages``
    (padding) are ignored.  ``bitmap_offset`` and ``pages_offset`` are
    absolute file offsets; ``header_offset`` is the offset of the block's
    record (its name length byte) in the RAM section.
    """

    noun = "block"

    def __init__(self, source: _Source, *, name: str, length: int, page_size: int,
                 bitmap_offset: int, pages_offset: int, bitmap: bytes,
                 header_offset: int, header_version: int) -> None:
        # the page-source view (see uffdpy.pagesource): page i at file_offset + i * page_size
        self._set_geometry(source, name=name, length=length, page_size=page_size,
                           file_offset=pages_offset, file_bytes=length,
                           header_offset=header_offset)
        self.bitmap_offset = bitmap_offset
        self.pages_offset = pages_offset
        self.bitmap = bitmap
        self.header_version = header_version
        used = (self.pages + 7) // 8
        bits = bytearray(bitmap[:used])
        if self.pages & 7:
            bits[-1] &= (1 << (self.pages & 7)) - 1
        self._bits = bytes(bits)
        self.present_pages = sum(self._bits.translate(POPCOUNT))
        self.zero_pages = self.pages - self.present_pages

    def __repr__(self) -> str:
        return (f"RamBlock(name={self.name!r}, length={self.length:#x}, page_size={self.page_size}, "
                f"pages={self.pages}, present_pages={self.present_pages}, "
                f"bitmap_offset={self.bitmap_offset:#x}, pages_offset={self.pages_offset:#x})")

    def is_present(self, i: int) -> bool:
        """True if page ``i`` has data in the file; False if it is a zero page.

        Raises: IndexError if ``i`` is not a page of this block.
        """
        self._check_index(i)
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    def read_pages(self, first: int, count: int) -> bytes:
        """``count`` pages from page ``first`` as one bytes object (zeros for clear bits).

        Raises: IndexError for a bad range; MappedRamError if the file is
        shorter than it was when opened; ValueError if the snapshot is closed.
        """
        self._check_range(first, count)
        out = bytearray(count * self.page_size)
        for run_first, run_count, present in bitmap_runs_in(self._bits, first, first + count):
            if present:
                lo = (run_first - first) * self.page_size
                out[lo:lo + run_count * self.page_size] = self._source.read_exact(
                    self.pages_offset + run_first * self.page_size, run_count * self.page_size,
                    f"pages {run_first}..{run_first + run_count - 1} of block {self.name!r}")
        return bytes(out)

    def runs(self) -> Iterator[Tuple[int, int, bool]]:
        """Yield ``(first_page, page_count, present)`` maximal runs covering the block in order."""
        return bitmap_runs(self._bits, self.pages)
