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
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import (Any, Dict, Iterable, Iterator, List,
                    Mapping, Optional, Sequence, Tuple, Union)

__all__ = [
    "MappedRamError", "NotMappedRamError", "DeviceSection", "RamBlock", "Snapshot",
    "BlockSpec", "write_snapshot", "rewrite_snapshot",
]

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

from .files import copy_range as _copy_range, pwrite_all as _pwrite_all, replacing
from .migstream import (MigCmd, QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF,
                        QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_END,
                        QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
                        QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION,
                        RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE,
                        RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE,
                        RAM_SAVE_FLAG_ZERO, RAM_SECTION_VERSION, configuration, counted)

MIG_CMD_SWITCHOVER_START = int(MigCmd.SWITCHOVER_START)
from .pagesource import (POPCOUNT, ImageError, ImageFile, OpenImage, PathLike, RegionBase,
                         RegionNotFound, bitmap_runs, bitmap_runs_in, set_bits)


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

    def expect_u8(self, value: int, what: str) -> None:
        at = self.pos
        got = self.u8(what)
        if got != value:
            raise MappedRamError(self.src.path, at, what, f"{value:#04x}", f"{got:#04x}")

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

@dataclass(frozen=True)
class DeviceSection:
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
        self._source = source
        self.name = name
        self.length = length
        self.page_size = page_size
        self.pages = length // page_size
        self.bitmap_offset = bitmap_offset
        self.pages_offset = pages_offset
        #: the page-source view (see uffdpy.pagesource): page i at file_offset + i * page_size
        self.file_offset = pages_offset
        self.file_bytes = length
        self.bitmap = bitmap
        self.header_offset = header_offset
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


#: the machine's own RAM block on x86 (``pc``/``q35``: pc.ram; ``-machine none``: ram)
MACHINE_RAM_IDS = ("pc.ram", "ram")
#: blocks with no slash that QEMU allocates itself: a user cannot give them a backend
_FIRMWARE_BLOCKS = ("pc.bios", "pc.rom", "isa-bios")


def backend_blocks(snap: "Snapshot") -> List[RamBlock]:
    """The blocks that are memory backends: the machine's RAM and NUMA backends.

    A user can give these a backend of their own (a file to map, a NUMA node's
    memory); a block QEMU creates itself (firmware, option ROMs, VGA RAM, ACPI
    tables: named with a ``/`` or one of ``pc.bios``/``pc.rom``) cannot.
    """
    return [b for b in snap.blocks
            if "/" not in b.name and b.name not in _FIRMWARE_BLOCKS
            and not b.name.endswith((".rom", ".bios"))]


class Snapshot(OpenImage):
    """An open, validated mapped-ram snapshot file.

    Use :meth:`open`; the object holds the file open until :meth:`close`
    (idempotent; also on ``with`` exit).  Attributes: ``path``, ``offset``
    (where the stream starts in the file), ``machine`` (machine type name),
    ``capabilities``, ``blocks`` (file order), ``devices`` (device sections in
    file order), ``vmdesc`` (the JSON trailer, or None), ``file_size``,
    ``ram_section_id``, ``device_state_range`` (start, end) of everything after
    the RAM sections: device sections, EOF byte and vmdesc, to copy verbatim,
    and ``early_device_state_range``, the device sections QEMU writes before
    the RAM section (``early_setup`` devices such as virtio-mem; usually
    empty).
    """

    noun = "snapshot"

    path: str
    offset: int
    machine: str
    capabilities: List[str]
    blocks: List[RamBlock]
    devices: List[DeviceSection]
    vmdesc: Optional[Dict[str, Any]]
    device_state_range: Tuple[int, int]
    file_size: int

    def __init__(self, source: _Source, offset: int) -> None:
        self._source: Optional[_Source] = source
        self.path = source.path
        self.offset = offset
        self.file_size = source.size
        self.machine = ""
        self.capabilities = []
        self.target_page_bits = TARGET_PAGE_BITS_DEFAULT
        self.uuid: Optional[bytes] = None
        self.blocks = []
        self.devices = []
        self.vmdesc = None
        self.ram_section_id = -1
        self.ram_section_offset = -1
        self.device_state_range = (source.size, source.size)
        self.early_device_state_range = (0, 0)
        self.eof_offset = -1
        self.vmdesc_offset: Optional[int] = None

    @classmethod
    def open(cls, path: PathLike, *, offset: int = 0) -> "Snapshot":
        """Open and validate the mapped-ram stream starting at byte ``offset`` of ``path``.

        Raises: OSError if the file cannot be opened; NotMappedRamError for a
        migration stream saved without mapped-ram; MappedRamError for any
        other malformation.
        """
        source = _Source(path)
        try:
            if offset < 0 or offset >= source.size:
                raise MappedRamError(source.path, None, "stream offset outside the file",
                                     f"0 <= offset < {source.size}", offset)
            snap = cls(source, offset)
            _Parser(snap, source).parse()
            return snap
        except BaseException:
            source.close()
            raise

    format = "mapped-ram"

    @property
    def regions(self) -> List[RamBlock]:
        """The blocks, as the page-source interface names them (see uffdpy.pagesource)."""
        return self.blocks

    def region(self, name: str) -> RamBlock:
        """Same as :meth:`block`."""
        return self.block(name)

    def block(self, name: str) -> RamBlock:
        """The RAMBlock named ``name``. Raises: RegionNotFound (a KeyError) if there is none."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise RegionNotFound(f"{self.path}: no RAMBlock named {name!r} "
                       f"(blocks: {', '.join(b.name for b in self.blocks)})")

    def __repr__(self) -> str:
        return (f"Snapshot(path={self.path!r}, offset={self.offset}, machine={self.machine!r}, "
                f"blocks={[b.name for b in self.blocks]}, devices={len(self.devices)})")


# --- parser -------------------------------------------------------------------------

class _Parser:
    def __init__(self, snap: Snapshot, src: _Source) -> None:
        self.snap = snap
        self.src = src
        self.cur = _Cursor(src, snap.offset)
        self.vmdesc_devices: Optional[List[Tuple[str, int]]] = None
        self.device_index = 0

    def err(self, offset: Optional[int], what: str, expected: object = None,
            actual: object = None) -> MappedRamError:
        return MappedRamError(self.src.path, offset, what, expected, actual)

    def parse(self) -> None:
        self._header()
        self._configuration()
        self._sections()

    # header and configuration

    def _header(self) -> None:
        cur = self.cur
        at = cur.pos
        magic = cur.be32("file magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise self.err(at, "not a QEMU migration stream: bad magic",
                           f"{QEMU_VM_FILE_MAGIC:#010x} ('QEVM')", f"{magic:#010x}")
        at = cur.pos
        version = cur.be32("stream version")
        if version != QEMU_VM_FILE_VERSION:
            raise self.err(at, "unsupported stream version", QEMU_VM_FILE_VERSION, version)

    def _configuration(self) -> None:
        cur, snap = self.cur, self.snap
        at = cur.pos
        kind = cur.u8("configuration section marker")
        if kind != QEMU_VM_CONFIGURATION:
            raise self.err(at, "configuration section (mapped-ram streams always carry one)",
                           f"{QEMU_VM_CONFIGURATION:#04x}", f"{kind:#04x}")
        at = cur.pos
        n = cur.be32("machine type length")
        if not 0 < n <= 256:
            raise self.err(at, "machine type length", "1..256", n)
        raw = cur.take(n, "machine type")
        try:
            snap.machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.err(at + 4, "machine type is not ASCII", "ASCII", repr(raw)) from None
        has_caps = False
        while True:
            at = cur.pos
            peek = self.src.read_exact(at, min(2 + len(_CONFIG_SUBSECTION_PREFIX),
                                               self.src.size - at), "configuration subsection")
            if (len(peek) < 2 or peek[0] != QEMU_VM_SUBSECTION
                    or peek[1] < len(_CONFIG_SUBSECTION_PREFIX) + 1
                    or not peek[2:].startswith(_CONFIG_SUBSECTION_PREFIX)):
                break
            cur.pos += 1
            name = cur.counted_string("configuration subsection name")
            vat = cur.pos
            sub_version = cur.be32(f"{name} version")
            if sub_version != 1:
                raise self.err(vat, f"{name} version", 1, sub_version)
            if name == "configuration/capabilities":
                cat = cur.pos
                count = cur.be32("capability count")
                if count > 64:
                    raise self.err(cat, "capability count", "<= 64", count)
                for _ in range(count):
                    snap.capabilities.append(cur.counted_string("capability name"))
                has_caps = True
            elif name == "configuration/target-page-bits":
                bat = cur.pos
                bits = cur.be32("target page bits")
                if not 12 <= bits <= 30:
                    raise self.err(bat, "target page bits", "12..30", bits)
                snap.target_page_bits = bits
            elif name == "configuration/uuid":
                snap.uuid = cur.take(16, "uuid")
            else:
                raise self.err(at, "unknown configuration subsection",
                               "capabilities, target-page-bits or uuid", repr(name))
        if "mapped-ram" not in snap.capabilities:
            listed = ", ".join(snap.capabilities) if has_caps else "no capabilities subsection"
            raise NotMappedRamError(self.src.path, cur.pos, "capabilities do not include mapped-ram",
                                    "mapped-ram", listed, hint=_NOT_MAPPED_RAM_HINT)

    # vmdesc trailer

    def _find_vmdesc(self, tail_start: int) -> None:
        """Locate the ``06 | be32 len | JSON`` trailer at the very end of the file, if any.

        Only bytes from ``tail_start`` on are searched (called when the first
        device section or the EOF byte is reached, so normally just the tail).
        """
        if self.snap.eof_offset >= 0:
            return
        src, snap = self.src, self.snap
        tail_start = max(tail_start, src.size - _MAX_TAIL_BYTES)
        # Device state is small; the tail before the vmdesc is read again later anyway.
        window = min(src.size - tail_start, 4 << 20)
        while True:
            start = src.size - window
            tail = src.read_exact(start, window, "vmdesc trailer")
            p = tail.rfind(b"{")
            found = None
            while p >= 5:
                q = p - 5
                if (tail[q] == QEMU_VM_VMDESCRIPTION
                        and _BE32.unpack_from(tail, q + 1)[0] == len(tail) - p):
                    found = q
                    break
                p = tail.rfind(b"{", 0, p)
            if found is not None or start == tail_start:
                break
            window = min(src.size - tail_start, window * 4)
        if found is None:
            snap.eof_offset = src.size - 1
            return
        json_at = start + found + 5
        try:
            desc = json.loads(tail[found + 5:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.err(json_at, "vmdesc trailer is not valid JSON", "a JSON object",
                           str(e)) from None
        if not isinstance(desc, dict):
            raise self.err(json_at, "vmdesc trailer", "a JSON object", type(desc).__name__)
        devices = desc.get("devices", [])
        listed: List[Tuple[str, int]] = []
        if not isinstance(devices, list):
            raise self.err(json_at, "vmdesc 'devices'", "a list", type(devices).__name__)
        for d in devices:
            if (not isinstance(d, dict) or not isinstance(d.get("name"), str)
                    or not isinstance(d.get("instance_id"), int)):
                raise self.err(json_at, "vmdesc device entry", "{name: str, instance_id: int}",
                               repr(d)[:80])
            listed.append((d["name"], d["instance_id"]))
        snap.vmdesc = desc
        snap.vmdesc_offset = start + found
        snap.eof_offset = start + found - 1
        self.vmdesc_devices = listed

    # sections

    def _sections(self) -> None:
        cur, snap = self.cur, self.snap
        ram_done = False
        device_phase = False
        config_end = cur.pos
        while True:
            at = cur.pos
            kind = cur.u8("section type")
            if kind in (QEMU_VM_EOF, QEMU_VM_SECTION_FULL):
                self._find_vmdesc(at)
            if kind == QEMU_VM_EOF:
                if at != snap.eof_offset:
                    raise self.err(at, "end of stream (QEMU_VM_EOF) position",
                                   f"{snap.eof_offset:#x} (just before the vmdesc trailer / end "
                                   "of file)", f"{at:#x}")
                if not ram_done:
                    raise self.err(at, "stream ends without a RAM section", "a 'ram' START section",
                                   "EOF")
                if not device_phase:
                    snap.device_state_range = (at, self.src.size)
                return
            if kind == QEMU_VM_SECTION_FULL:
                if ram_done and not device_phase:
                    device_phase = True
                    snap.device_state_range = (at, self.src.size)
                self._device_section(at, early=not ram_done)
            elif device_phase:
                raise self.err(at, "section type after device state", "FULL (0x04) or EOF (0x00)",
                               f"{kind:#04x}")
            elif kind == QEMU_VM_SECTION_START:
                if ram_done:
                    raise self.err(at, "second START section", "PART/END/FULL/EOF", "START")
                snap.early_device_state_range = (config_end, at)
                self._ram_start(at)
                ram_done = True
            elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                if not ram_done:
                    raise self.err(at, "PART/END section before the RAM START section")
                sid = cur.be32("section id")
                if sid != snap.ram_section_id:
                    raise self.err(at + 1, "PART/END section id (only 'ram' is iterable here)",
                                   snap.ram_section_id, sid)
                self._ram_eos()
                cur.footer(sid, "RAM PART/END section")
            elif kind == QEMU_VM_COMMAND:
                cmd_at = cur.pos
                cmd = cur.be16("command")
                length = cur.be16("command length")
                if (cmd, length) != (MIG_CMD_SWITCHOVER_START, 0):
                    raise self.err(cmd_at, "command (only SWITCHOVER_START is expected with "
                                   "mapped-ram)", f"{MIG_CMD_SWITCHOVER_START:#06x} length 0",
                                   f"{cmd:#06x} length {length}")
            else:
                raise self.err(at, "section type",
                               "EOF, START, PART, END, FULL or COMMAND (0x00-0x04, 0x08)",
                               f"{kind:#04x}")

    def _ram_eos(self) -> None:
        at = self.cur.pos
        word = self.cur.be64("RAM flags word")
        if word != RAM_SAVE_FLAG_EOS:
            self._bad_ram_word(at, word, "EOS (0x10)")

    def _bad_ram_word(self, at: int, word: int, expected: str) -> None:
        mask = (1 << self.snap.target_page_bits) - 1
        flags = word & mask
        bad = flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE
                       | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_MULTIFD_FLUSH)
        what = "RAM flags word"
        if bad:
            what += " (flags that mapped-ram never writes)"
        raise self.err(at, what, expected, f"{word:#x}")

    def _ram_start(self, at: int) -> None:
        cur, snap, src = self.cur, self.snap, self.src
        sid = cur.be32("section id")
        name_at = cur.pos
        name = cur.counted_string("section name")
        instance = cur.be32("section instance")
        vat = cur.pos
        version = cur.be32("section version")
        if name != RAM_SECTION_IDSTR or instance != 0:
            raise self.err(name_at, "START section (only the 'ram' iterable section is supported)",
                           "'ram' instance 0", f"{name!r} instance {instance}")
        if version != RAM_SECTION_VERSION:
            raise self.err(vat, "'ram' section version", RAM_SECTION_VERSION, version)
        snap.ram_section_id = sid
        snap.ram_section_offset = at
        word_at = cur.pos
        word = cur.be64("RAM MEM_SIZE word")
        mask = (1 << snap.target_page_bits) - 1
        if word & mask != RAM_SAVE_FLAG_MEM_SIZE:
            self._bad_ram_word(word_at, word, "MEM_SIZE (0x04) with the total RAM size")
        total = word & ~mask
        consumed = 0
        ignore_shared = "x-ignore-shared" in snap.capabilities
        regions: List[Tuple[int, int, str]] = [
            (snap.offset, cur.pos, "stream header and RAM section start")]
        names = set()
        while consumed < total:
            rec_at = cur.pos
            name = cur.counted_string("RAMBlock name")
            if not name:
                raise self.err(rec_at, "RAMBlock name length", ">= 1", 0)
            if name in names:
                raise self.err(rec_at, "RAMBlock name", "a unique name", f"duplicate {name!r}")
            names.add(name)
            len_at = cur.pos
            length = cur.be64(f"used length of {name!r}")
            if ignore_shared:
                cur.be64(f"guest address of {name!r}")
            hdr_at = cur.pos
            hdr_version, page_size, bitmap_offset, pages_offset = _HEADER.unpack(
                cur.take(MAPPED_RAM_HEADER_SIZE, f"MappedRamHeader of {name!r}"))
            hdr_end = cur.pos
            if hdr_version > MAPPED_RAM_HDR_VERSION:
                raise self.err(hdr_at, "bad RAMBlock header version",
                               f"<= {MAPPED_RAM_HDR_VERSION}", hdr_version)
            if page_size != TARGET_PAGE_SIZE:
                # QEMU writes its target page size here and nothing else.  10.0.2
                # does not check it on load (it then misplaces every page); later
                # QEMU refuses it, and so do we: loading such a file by the 4 KiB
                # page would give zeros or wrong data.
                raise self.err(hdr_at + 4, f"page size of {name!r} (QEMU writes its "
                               "target page size; no QEMU loads any other correctly)",
                               TARGET_PAGE_SIZE, page_size)
            if length % page_size:
                raise self.err(len_at, f"used length of {name!r}",
                               f"a multiple of the page size {page_size}", f"{length:#x}")
            if consumed + length > total:
                raise self.err(len_at, f"used length of {name!r} (sum exceeds MEM_SIZE total)",
                               f"<= {total - consumed:#x}", f"{length:#x}")
            if pages_offset % 4096:
                raise self.err(hdr_at + 20, f"pages offset of {name!r}", "4096-aligned",
                               f"{pages_offset:#x}")
            pages = length // page_size
            bitmap_size = _bitmap_size(pages)
            for what, off, size, field_at in (("bitmap", bitmap_offset, bitmap_size, hdr_at + 12),
                                              ("pages region", pages_offset, length, hdr_at + 20)):
                if off < snap.offset or off + size > src.size:
                    raise self.err(field_at, f"{what} of {name!r} outside the stream",
                                   f"[{snap.offset:#x}, {src.size:#x})",
                                   f"[{off:#x}, {off + size:#x})")
            next_at = pages_offset + length
            if next_at < hdr_end:
                raise self.err(hdr_at + 20, f"pages region of {name!r} ends before its header",
                               f"end >= {hdr_end:#x}", f"{next_at:#x}")
            regions.append((rec_at, hdr_end, f"record of {name!r}"))
            regions.append((bitmap_offset, bitmap_offset + bitmap_size, f"bitmap of {name!r}"))
            regions.append((pages_offset, pages_offset + length, f"pages of {name!r}"))
            bitmap = src.read_exact(bitmap_offset, bitmap_size, f"bitmap of {name!r}")
            snap.blocks.append(RamBlock(
                src, name=name, length=length, page_size=page_size,
                bitmap_offset=bitmap_offset, pages_offset=pages_offset, bitmap=bitmap,
                header_offset=rec_at, header_version=hdr_version))
            consumed += length
            cur.pos = next_at
        regions.append((cur.pos, src.size, "end of the RAM section and device state"))
        self._check_overlaps(regions)
        self._ram_eos()
        cur.footer(sid, "RAM START section")

    def _check_overlaps(self, regions: List[Tuple[int, int, str]]) -> None:
        spans = sorted((r for r in regions if r[1] > r[0]), key=lambda r: (r[0], r[1]))
        for (a0, a1, aname), (b0, b1, bname) in zip(spans, spans[1:]):
            if b0 < a1:
                raise self.err(b0, f"{bname} overlaps {aname}", f"start >= {a1:#x}", f"{b0:#x}")

    # device sections

    def _device_section(self, at: int, *, early: bool) -> None:
        cur, snap = self.cur, self.snap
        sid = cur.be32("section id")
        name_at = cur.pos
        name = cur.counted_string("device section name")
        instance = cur.be32("device section instance")
        version = cur.be32("device section version")
        body = cur.pos
        k = self.device_index
        expected: Optional[Tuple[str, int]] = None
        following: Optional[Tuple[str, int]] = None
        if self.vmdesc_devices is not None:
            if k >= len(self.vmdesc_devices):
                raise self.err(at, "device section not listed in the vmdesc trailer",
                               f"{len(self.vmdesc_devices)} device sections",
                               f"section {k} ({name!r})")
            expected = self.vmdesc_devices[k]
            if (name, instance) != expected:
                raise self.err(name_at, f"device section {k} (vmdesc order)",
                               f"{expected[0]!r} instance {expected[1]}",
                               f"{name!r} instance {instance}")
            if k + 1 < len(self.vmdesc_devices):
                following = self.vmdesc_devices[k + 1]
        self.device_index += 1
        end = self._device_end(body, sid, early=early, following=following, last=(
            self.vmdesc_devices is not None and following is None))
        snap.devices.append(DeviceSection(name=name, instance=instance, version=version,
                                          section_id=sid, offset=at, length=end - at))
        cur.pos = end

    def _device_end(self, body: int, sid: int, *, early: bool,
                    following: Optional[Tuple[str, int]], last: bool) -> int:
        """Find the end of a device section whose body starts at ``body``.

        The body's layout is device-specific, so look for the footer
        ``7e | be32 sid`` followed by something that can only start the next
        thing in the stream: the next device section of the vmdesc list, the
        RAM START section (early sections), or the EOF byte at its known offset.
        """
        src, snap = self.src, self.snap
        footer = bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(sid)
        limit = snap.eof_offset if not early else src.size
        window = 1 << 16
        while True:
            stop = min(limit, body + window)
            buf = src.read_exact(body, stop - body, "device section")
            p = buf.find(footer)
            while p >= 0:
                nxt = body + p + 5
                if self._plausible_next(buf, p + 5, nxt, early=early, following=following,
                                        last=last):
                    return nxt
                p = buf.find(footer, p + 1)
            if stop >= limit:
                break
            window *= 4
        raise self.err(body, "end of device section (footer followed by the next section)",
                       f"7e {sid:08x} then the next section", "no such footer")

    def _plausible_next(self, buf: bytes, i: int, nxt: int, *, early: bool,
                        following: Optional[Tuple[str, int]], last: bool) -> bool:
        if not early and nxt == self.snap.eof_offset:
            return True
        if last or i >= len(buf):
            return False
        kind = buf[i]
        if kind == QEMU_VM_SECTION_START and early:
            return buf[i + 5:i + 9] == b"\x03ram"
        if kind != QEMU_VM_SECTION_FULL or i + 6 > len(buf):
            return False
        n = buf[i + 5]
        name = buf[i + 6:i + 6 + n]
        inst = buf[i + 6 + n:i + 10 + n]
        if len(inst) < 4 or n == 0:
            return False
        if following is not None:
            return name == following[0].encode("ascii", "replace") and \
                _BE32.unpack(inst)[0] == following[1]
        return all(32 < c < 127 for c in name)


# --- writer -------------------------------------------------------------------------

BytesLike = Union[bytes, bytearray, memoryview]
Chunks = Iterable[Tuple[int, BytesLike]]


@dataclass(frozen=True)
class BlockSpec:
    """A RAMBlock for :func:`write_snapshot`.

    ``name`` is the RAMBlock idstr QEMU knows it by (``ram`` for ``-machine
    none``, ``pc.ram``, a memory-backend id, ...), ``length`` its used length
    in bytes.  ``data`` is either the whole contents (a bytes-like object of
    ``length`` bytes), or an iterable of ``(first_page, chunk)`` pairs in
    increasing, non-overlapping page order, each chunk a whole number of pages
    (so multi-GiB blocks can be streamed), or None for an all-zero block.
    Pages not covered, and pages whose bytes are all zero, are left out of the
    file (bit clear), as QEMU does.
    """

    name: str
    length: int
    data: Union[BytesLike, Chunks, None] = None


BlockArg = Union[BlockSpec, Tuple[str, Union[BytesLike, int]]]


def _as_spec(arg: BlockArg) -> BlockSpec:
    if isinstance(arg, BlockSpec):
        return arg
    name, contents = arg
    if isinstance(contents, int):
        return BlockSpec(name, contents, None)
    return BlockSpec(name, memoryview(contents).nbytes, contents)


def _configuration_bytes(machine: str, capabilities: Sequence[str]) -> bytes:
    return configuration(machine, capabilities=capabilities)


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _iter_chunks(spec: BlockSpec, page_size: int) -> Iterator[Tuple[int, memoryview]]:
    if spec.data is None:
        return
    data: Any = spec.data
    try:
        view = memoryview(data)         # bytes, bytearray, mmap, array...
    except TypeError:                   # an iterable of (first_page, chunk)
        for first, chunk in data:
            yield (first, memoryview(chunk).cast("B"))
        return
    view = view.cast("B")
    if view.nbytes != spec.length:
        raise ValueError(f"block {spec.name!r}: data is {view.nbytes} bytes, length is "
                         f"{spec.length}")
    yield (0, view)


def _nonzero_runs(view: memoryview, page_size: int) -> Iterator[Tuple[int, int]]:
    """(first, count) runs of pages of ``view`` that are not all zero."""
    zero = bytes(page_size)
    pages = view.nbytes // page_size
    start = -1
    for j in range(pages):
        if view[j * page_size:(j + 1) * page_size] == zero:
            if start >= 0:
                yield (start, j - start)
                start = -1
        elif start < 0:
            start = j
    if start >= 0:
        yield (start, pages - start)


def write_snapshot(path: PathLike, blocks: Sequence[BlockArg], *, machine: str = "none",
                   page_size: int = 4096, capabilities: Sequence[str] = ("mapped-ram",),
                   device_state: Optional[BytesLike] = None, early_device_state: BytesLike = b"",
                   offset: int = 0, ram_section_id: int = 1,
                   pages_alignment: int = MAPPED_RAM_FILE_OFFSET_ALIGNMENT) -> None:
    """Write a mapped-ram snapshot that QEMU 10 loads with ``migrate-incoming``.

    The layout is the one QEMU writes: header, configuration, optional early
    device sections (``early_device_state``, verbatim), the RAM START section
    with every block's record, MappedRamHeader, bitmap right after it and pages
    region on the next 1 MiB boundary, EOS and footer, an END section, then
    ``device_state`` verbatim.  ``device_state`` must be everything QEMU writes
    after the RAM sections (device sections, EOF byte, vmdesc trailer), e.g.
    ``Snapshot.read_range(*snap.device_state_range)``; with None the file gets
    no device sections (QEMU then starts the VM with reset device state), an
    EOF byte and a minimal vmdesc.  ``blocks`` are :class:`BlockSpec` or
    ``(name, contents_or_length_in_bytes)`` pairs, written in the order given.
    Zero pages are never written, so the file is sparse.  Bytes of ``path``
    before ``offset`` are kept (as with ``file:PATH,offset=N``).

    ``pages_alignment`` (bytes) is where each pages region starts: QEMU
    uses 1 MiB; QEMU 10 also loads 4096.

    ``machine`` must be the exact machine type of the destination (``none``,
    ``pc-q35-10.0``...); ``page_size`` is bytes per bitmap bit and must be 4096,
    x86 QEMU's target page size (the reader refuses any other).

    Raises: ValueError for inconsistent arguments (lengths not a multiple of
    ``page_size``, chunks out of order or out of range, duplicate names);
    OSError from the file system.
    """
    if page_size != TARGET_PAGE_SIZE:
        raise ValueError(f"page_size must be the target page size {TARGET_PAGE_SIZE}, "
                         f"not {page_size}: QEMU loads no other correctly")
    if "mapped-ram" not in capabilities:
        raise ValueError("capabilities must include 'mapped-ram'")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    if pages_alignment < 4096 or pages_alignment % 4096:
        raise ValueError(f"pages_alignment must be a multiple of 4096, not {pages_alignment}")
    specs = [_as_spec(b) for b in blocks]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"duplicate block name {spec.name!r}")
        seen.add(spec.name)
        if spec.length <= 0 or spec.length % page_size:
            # a zero-length block cannot be told apart from the end of the block list
            raise ValueError(f"block {spec.name!r}: length {spec.length} is not a positive "
                             f"multiple of the page size {page_size}")
    total = sum(s.length for s in specs)
    if total & (page_size - 1) or total >= 1 << 64:
        raise ValueError(f"total RAM size {total} cannot be encoded")

    head = bytearray(_BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION))
    head += _configuration_bytes(machine, capabilities)
    head += bytes(early_device_state)
    head += bytes([QEMU_VM_SECTION_START]) + _BE32.pack(ram_section_id) + counted(
        RAM_SECTION_IDSTR) + _BE32.pack(0) + _BE32.pack(RAM_SECTION_VERSION)
    head += _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)
    pos = offset + len(head)

    with replacing(path, keep_prefix=offset) as fd:
        os.ftruncate(fd, offset)
        _pwrite_all(fd, head, offset)
        for spec in specs:
            pages = spec.length // page_size
            record = counted(spec.name) + _BE64.pack(spec.length)
            hdr_at = pos + len(record)
            bitmap_offset = hdr_at + MAPPED_RAM_HEADER_SIZE
            bitmap = bytearray(_bitmap_size(pages))
            pages_offset = _round_up(bitmap_offset + len(bitmap), pages_alignment)
            next_page = 0
            for first, view in _iter_chunks(spec, page_size):
                count, rest = divmod(view.nbytes, page_size)
                if rest or first < next_page or first + count > pages:
                    raise ValueError(
                        f"block {spec.name!r}: chunk at page {first} of {view.nbytes} bytes is not "
                        f"whole pages in increasing order inside the block ({pages} pages)")
                for run_first, run_count in _nonzero_runs(view, page_size):
                    set_bits(bitmap, first + run_first, run_count)
                    _pwrite_all(fd, view[run_first * page_size:(run_first + run_count) * page_size],
                                pages_offset + (first + run_first) * page_size)
                next_page = first + count
            header = _HEADER.pack(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)
            _pwrite_all(fd, record + header + bytes(bitmap), pos)
            pos = pages_offset + spec.length
        tail = bytearray(_BE64.pack(RAM_SAVE_FLAG_EOS))
        tail += bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(ram_section_id)
        tail += bytes([QEMU_VM_SECTION_END]) + _BE32.pack(ram_section_id)
        tail += _BE64.pack(RAM_SAVE_FLAG_EOS)
        tail += bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(ram_section_id)
        if device_state is None:
            desc = json.dumps({"page_size": page_size, "devices": []}).encode()
            tail += bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]) + _BE32.pack(len(desc)) + desc
        else:
            tail += bytes(device_state)
        _pwrite_all(fd, tail, pos)
        os.ftruncate(fd, pos + len(tail))


def rewrite_snapshot(src: Union[Snapshot, PathLike], dst: PathLike,
                     patches: Mapping[Tuple[str, int], BytesLike], *, offset: int = 0) -> None:
    """Copy snapshot ``src`` to ``dst`` with some pages replaced.

    ``patches`` maps ``(block name, page index)`` to the page's new bytes
    (exactly ``page_size`` bytes; an all-zero page clears the page's bit).
    Every byte outside the patched pages and their bitmaps is carried over
    unchanged (headers, device state, vmdesc, bytes before the stream offset),
    and zero pages stay holes.  ``offset`` is used only when ``src`` is a path.

    Raises: MappedRamError if ``src`` is not a valid snapshot; KeyError for an
    unknown block; IndexError for a page index out of range; ValueError for a
    patch of the wrong size or ``dst`` being the source file; OSError.
    """
    snap = src if isinstance(src, Snapshot) else Snapshot.open(src, offset=offset)
    try:
        checked: Dict[str, List[Tuple[int, bytes]]] = {}
        for (name, index), page in patches.items():
            block = snap.block(name)
            block.page_offset(index)
            data = bytes(page)
            if len(data) != block.page_size:
                raise ValueError(f"patch for page {index} of {name!r} is {len(data)} bytes, "
                                 f"expected {block.page_size}")
            checked.setdefault(name, []).append((index, data))
        dst_path = os.fspath(dst)
        if os.path.exists(dst_path) and os.path.samefile(dst_path, snap.path):
            raise ValueError(f"{dst_path}: destination is the source snapshot")
        src_fd = snap.fileno()
        with replacing(dst_path, not_same_as=[snap.path]) as fd:
            os.ftruncate(fd, snap.file_size)
            cursor = 0
            for block in sorted(snap.blocks, key=lambda b: b.pages_offset):
                _copy_range(src_fd, fd, cursor, block.pages_offset, skip_zero=True)
                for first, count, present in block.runs():
                    if present:
                        start = block.pages_offset + first * block.page_size
                        _copy_range(src_fd, fd, start, start + count * block.page_size,
                                    skip_zero=False)
                cursor = block.pages_offset + block.length
            _copy_range(src_fd, fd, cursor, snap.file_size, skip_zero=True)
            zero_page: Optional[bytes] = None
            for block in snap.blocks:
                if block.name not in checked:
                    continue
                bitmap = bytearray(block.bitmap)
                for index, data in checked[block.name]:
                    if zero_page is None or len(zero_page) != block.page_size:
                        zero_page = bytes(block.page_size)
                    if data == zero_page:
                        _clear_bit(bitmap, index)
                    else:
                        set_bits(bitmap, index, 1)
                        _pwrite_all(fd, data, block.page_offset(index))
                _pwrite_all(fd, bitmap, block.bitmap_offset)
    finally:
        if snap is not src:
            snap.close()
