"""Reader for ELF core files as memory images (pure file-format code).

Two producers write memory as an ELF core, and both are page sources for the
loader (see :mod:`uffdpy.pagesource`):

* QEMU's ``dump-guest-memory`` (QMP, ``paging: false``, ELF format): one
  ``PT_LOAD`` segment per contiguous range of guest RAM, at its
  guest-physical address (``p_paddr``; ``p_vaddr`` holds the same number),
  plus a ``PT_NOTE`` segment with a ``CORE``/``NT_PRSTATUS`` and a ``QEMU``
  (QEMUCPUState) note per CPU.  Segment file offsets are *not* page-aligned
  (the first segment starts right after the notes, e.g. at ``0x3d8``), and
  ``p_filesz == p_memsz``.  A machine without a 64-bit CPU (``-machine
  none``) is dumped as ELFCLASS32/EM_386, which this module refuses.
* A Linux process core, from the kernel (a crash with ``RLIMIT_CORE`` set) or
  from ``gcore`` (gdb): one ``PT_LOAD`` per mapping at its virtual address
  (``p_paddr`` is 0).  The kernel writes page-aligned offsets and often
  ``p_filesz < p_memsz`` (0 for mappings it does not dump, one page for the
  ELF header of a file-backed text mapping); gcore writes unaligned offsets
  and ``p_filesz == p_memsz``.  The part of a segment past ``p_filesz`` reads
  as zeros here; for a process core that means "not dumped", not
  necessarily "was zero".

The address-space rule
----------------------
``address_space`` is ``"guest-physical"`` when any note is owned by
``"QEMU"`` or any ``PT_LOAD`` has a non-zero ``p_paddr`` (Linux and gdb
always write ``p_paddr = 0`` for process cores); otherwise ``"virtual"``.
A region's ``address`` is ``p_paddr`` in the first case and ``p_vaddr`` in
the second.  (A QEMU dump with no notes and one segment at physical address 0
would be called "virtual"; with ``paging: false`` QEMU writes
``p_vaddr == p_paddr``, so the addresses are the same either way.)

Regions
-------
Every ``PT_LOAD`` with ``p_memsz > 0`` is an :class:`ElfRegion`, in
program-header order (``PT_LOAD`` with ``p_memsz == 0`` describes no memory
and is skipped).  Its ``name`` is the inclusive address range it covers,
``"0x%016x-0x%016x" % (address, address + length - 1)``, unique because
regions may not overlap.  ``length`` is ``p_memsz`` rounded up to the 4096
byte page; page *i* is present (its bytes are, at least partly, in the file)
iff ``i * 4096 < p_filesz``; the rest reads as zeros.

Validation
----------
Everything is checked when the file is opened; every problem is an
:class:`ElfImageError` (one line: file, offset of the offending header,
what, expected, actual).  pyelftools reads the ELF header, the program
headers and the notes; whatever it raises on a malformed file is turned into
an ElfImageError too.  Only 64-bit little-endian ``ET_CORE`` files are
accepted.

This module imports nothing kernel-facing; it works on any OS.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple, cast

from elftools.common.exceptions import ELFError
from elftools.common.utils import struct_parse
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE
from elftools.elf.segments import NoteSegment

from .pagesource import (ImageError, ImageFile, OpenImage, PathLike, RegionBase, RegionNotFound,
                         bitmap_runs, set_bits)

__all__ = ["ElfImageError", "ElfImage", "ElfRegion", "ElfNote", "PAGE_SIZE",
           "MAX_SEGMENTS", "MAX_SEGMENT_BYTES", "MAX_TOTAL_BYTES", "MAX_NOTES_BYTES", "MAX_NOTES"]

PAGE_SIZE = 4096
#: more program headers than this is absurd (a process has at most ~65530 mappings)
MAX_SEGMENTS = 1 << 20
#: a PT_LOAD larger than this (1 TiB) is refused
MAX_SEGMENT_BYTES = 1 << 40
#: all PT_LOAD segments together larger than this (16 TiB) is refused
MAX_TOTAL_BYTES = 1 << 44
#: a PT_NOTE segment larger than this (64 MiB) is refused (notes are read when opening)
MAX_NOTES_BYTES = 64 << 20
#: more notes than this in one image is refused: each costs pyelftools tens of
#: microseconds to parse (a core of a process with 10,000 threads has ~60,000);
#: UFFDPY_MAX_NOTES raises it
MAX_NOTES = int(os.environ.get("UFFDPY_MAX_NOTES", 1 << 17))

ELF64_EHDR_SIZE = 64
ELF64_PHDR_SIZE = 56
ELF64_NHDR_SIZE = 12
_E_TYPE_OFFSET = 16
_E_PHENTSIZE_OFFSET = 54
_PF_R, _PF_W, _PF_X = 4, 2, 1

#: whatever pyelftools (and construct under it) raises on malformed input
_LIB_ERRORS = (ELFError, ConstructError, struct.error, ValueError, OverflowError, EOFError,
               KeyError, IndexError, TypeError, AttributeError, UnicodeError, RecursionError)

_QEMU_ELF32_HINT = ("QEMU writes ELF32 when the CPU is not in long mode and all RAM is below 4 GiB, "
                    "e.g. for -machine none; "
                    "dump a machine with a CPU such as -machine pc")
_NOTE_TYPES: Dict[int, str] = {v: k for k, v in ENUM_CORE_NOTE_N_TYPE.items()
                               if isinstance(v, int) and not k.startswith("_")}
_NOTE_NUMBERS: Dict[str, int] = {k: v for v, k in _NOTE_TYPES.items()}
#: note types pyelftools does not name, by owner: QEMU's per-CPU state
#: (``QEMUCPUState`` in QEMU's target/i386/arch_dump.c), the kernel's x86
#: XSAVE area and gdb's target description
_OWNER_NOTE_TYPES: Dict[Tuple[str, int], str] = {
    ("QEMU", 0): "QEMU_CPU_STATE",
    ("LINUX", 0x202): "NT_X86_XSTATE",
    ("GDB", 0xff000000): "NT_GDB_TDESC",
}


class ElfImageError(ImageError):
    """An ELF core file is malformed, or is not a core uffdpy can load.

    Attributes (from :class:`~uffdpy.pagesource.ImageError`): ``path``,
    ``offset`` (absolute file offset of the offending header, or None),
    ``what``, ``expected``, ``actual``, ``hint``.
    """


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


# --- low-level reading -----------------------------------------------------------------

class _Source(ImageFile):
    """An open file read with pread; every read is exact or raises ElfImageError."""

    error = ElfImageError
    noun = "ELF image"


class _Stream(io.RawIOBase):
    """A seekable read-only view of a _Source for pyelftools, with a movable end.

    Reads never go past ``limit`` (the file size unless narrowed), so a note
    claiming a huge size cannot make pyelftools read more than its segment.
    """

    def __init__(self, src: _Source) -> None:
        super().__init__()
        self.src = src
        self.pos = 0
        self.limit = src.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.limit}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def read(self, size: Optional[int] = -1) -> bytes:
        end = self.limit if size is None or size < 0 else min(self.limit, self.pos + size)
        if end <= self.pos:
            return b""
        data = self.src.read_exact(self.pos, end - self.pos, "ELF data")
        self.pos = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


# --- model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ElfNote:
    """One note of a ``PT_NOTE`` segment.

    ``name`` is the owner (``"CORE"``, ``"LINUX"``, ``"QEMU"``, ``"GDB"``...),
    ``type`` the numeric ``n_type``, ``type_name`` its name when pyelftools
    knows it (``"NT_PRSTATUS"``), else ``hex(type)``; ``offset`` the file
    offset of the note header, ``size`` the descriptor size (``n_descsz``) and
    ``desc_offset`` the file offset of the descriptor.
    """

    name: str
    type: int
    type_name: str
    offset: int
    size: int
    desc_offset: int = 0


def _perms(flags: int) -> str:
    return "".join(c if flags & bit else "-" for c, bit in (("r", _PF_R), ("w", _PF_W),
                                                             ("x", _PF_X)))


class ElfRegion(RegionBase):
    """One ``PT_LOAD`` segment as a page-source region (see the module docstring).

    Attributes: ``name``, ``address`` (``paddr`` or ``vaddr``, per the image's
    ``address_space``), ``vaddr``, ``paddr``, ``length`` (``memsz`` rounded up
    to ``page_size``), ``memsz``, ``page_size``, ``pages``, ``present_pages``,
    ``zero_pages``, ``file_offset`` (``p_offset``), ``file_bytes``
    (``p_filesz``), ``flags`` (``p_flags``), ``perms`` ("rwx" style),
    ``segment_index`` (index in the program header table) and
    ``header_offset`` (file offset of that program header).
    """

    def __init__(self, source: _Source, *, address: int, vaddr: int, paddr: int, memsz: int,
                 file_offset: int, file_bytes: int, flags: int, segment_index: int,
                 header_offset: int, page_size: int = PAGE_SIZE) -> None:
        length = -(-memsz // page_size) * page_size
        self._set_geometry(source, name=f"{address:#018x}-{address + length - 1:#018x}",
                           length=length, page_size=page_size, file_offset=file_offset,
                           file_bytes=file_bytes, header_offset=header_offset)
        self.address, self.vaddr, self.paddr, self.memsz = address, vaddr, paddr, memsz
        self.flags = flags
        self.segment_index = segment_index
        self.present_pages = -(-file_bytes // page_size)
        self.zero_pages = self.pages - self.present_pages
        self._bitmap: Optional[bytes] = None

    @property
    def perms(self) -> str:
        return _perms(self.flags)

    @property
    def end(self) -> int:
        """First address past the region."""
        return self.address + self.length

    @property
    def bitmap(self) -> bytes:
        """Bit *i* (``bitmap[i >> 3] >> (i & 7) & 1``) is set when page *i* is in the file.

        Built on first use (``ceil(pages / 8)`` bytes).
        """
        if self._bitmap is None:
            bits = bytearray((self.pages + 7) // 8)
            set_bits(bits, 0, self.present_pages)
            self._bitmap = bytes(bits)
        return self._bitmap

    def __repr__(self) -> str:
        return (f"ElfRegion(name={self.name!r}, segment_index={self.segment_index}, "
                f"perms={self.perms!r}, pages={self.pages}, present_pages={self.present_pages}, "
                f"file_offset={self.file_offset:#x}, file_bytes={self.file_bytes:#x})")

    def is_present(self, i: int) -> bool:
        """True if page ``i`` has bytes in the file. Raises: IndexError for a bad index."""
        self._check_index(i)
        return i < self.present_pages

    def runs(self) -> Iterator[Tuple[int, int, bool]]:
        """Maximal ``(first_page, count, present)`` runs in order (at most two)."""
        return bitmap_runs(self.bitmap, self.pages)

    def read_pages(self, first: int, count: int) -> bytes:
        """``count`` pages from page ``first`` as one bytes object (pread, zeros past ``file_bytes``).

        Raises: IndexError for a bad range; ElfImageError if the file is
        shorter than it was when opened; ValueError if the image is closed.
        """
        self._check_range(first, count)
        lo = first * self.page_size
        hi = min((first + count) * self.page_size, self.file_bytes)
        size = count * self.page_size
        if hi <= lo:
            return bytes(size)
        data = self._source.read_exact(self.file_offset + lo, hi - lo,
                                       f"pages {first}..{first + count - 1} of region {self.name}")
        return data if len(data) == size else data + bytes(size - len(data))


class ElfImage(OpenImage):
    """An open, validated ELF core file (see the module docstring).

    Use :meth:`open`; the file stays open until :meth:`close` (idempotent;
    also on ``with`` exit).  Attributes: ``path``, ``file_size``, ``format``
    (``"elf-core"``), ``address_space`` (``"guest-physical"`` or
    ``"virtual"``), ``machine`` (``e_machine``, e.g. ``"EM_X86_64"``),
    ``regions`` (:class:`ElfRegion`, program-header order), ``notes``
    (:class:`ElfNote`, file order), ``segments`` (number of program headers).
    """

    noun = "ELF image"

    format = "elf-core"
    path: str
    file_size: int
    address_space: str
    machine: str
    regions: List[ElfRegion]
    notes: List[ElfNote]
    segments: int

    def __init__(self, source: _Source) -> None:
        self._source: Optional[_Source] = source
        self.path = source.path
        self.file_size = source.size
        self.address_space = "virtual"
        self.machine = ""
        self.regions = []
        self.notes = []
        self.segments = 0

    @classmethod
    def open(cls, path: PathLike) -> "ElfImage":
        """Open and validate the ELF core ``path``.

        Raises: OSError if the file cannot be opened; ElfImageError if it is
        not a 64-bit little-endian ELF core this module can read.
        """
        source = _Source(path)
        try:
            image = cls(source)
            _Parser(image, source).parse()
            return image
        except BaseException:
            source.close()
            raise

    def region(self, name: str) -> ElfRegion:
        """The region named ``name``. Raises: RegionNotFound (a KeyError) naming the available ones."""
        for r in self.regions:
            if r.name == name:
                return r
        listed = ", ".join(r.name for r in self.regions[:20])
        more = f" and {len(self.regions) - 20} more" if len(self.regions) > 20 else ""
        raise RegionNotFound(f"{self.path}: no region named {name!r} (regions: {listed}{more})")

    def region_at(self, address: int) -> ElfRegion:
        """The region whose ``[address, end)`` contains ``address``. Raises: RegionNotFound (a KeyError)."""
        for r in self.regions:
            if r.address <= address < r.end:
                return r
        raise RegionNotFound(f"{self.path}: no region contains {self.address_space} address "
                       f"{address:#x}")

    def __repr__(self) -> str:
        return (f"ElfImage(path={self.path!r}, machine={self.machine!r}, "
                f"address_space={self.address_space!r}, regions={len(self.regions)}, "
                f"notes={len(self.notes)}{', closed' if self.closed else ''})")


# --- parser ------------------------------------------------------------------------------

class _Parser:
    def __init__(self, image: ElfImage, src: _Source) -> None:
        self.image = image
        self.src = src
        self.stream = _Stream(src)
        self.io = cast(IO[bytes], self.stream)   # what pyelftools is typed to take

    def err(self, offset: Optional[int], what: str, expected: object = None,
            actual: object = None, hint: Optional[str] = None) -> ElfImageError:
        return ElfImageError(self.src.path, offset, what, expected, actual, hint)

    def lib_err(self, offset: Optional[int], what: str, e: BaseException) -> ElfImageError:
        return self.err(offset, f"malformed {what}", "a well-formed ELF core",
                        f"{type(e).__name__}: {_one_line(e)}")

    def parse(self) -> None:
        elf = self._header()
        loads, note_segments = self._program_headers(elf)
        for offset, size, header_offset in note_segments:
            self._notes(elf, offset, size, header_offset)
        self._regions(loads)

    # ELF header

    def _header(self) -> ELFFile:
        src = self.src
        magic = src.read_exact(0, 4, "ELF magic") if src.size >= 4 else b""
        if magic != b"\x7fELF":
            raise self.err(0, "not an ELF file: bad magic", "b'\\x7fELF'", repr(src.read_exact(
                0, min(4, src.size), "ELF magic")))
        try:
            elf = ELFFile(self.io)
        except _LIB_ERRORS as e:
            for field, at in (("EI_CLASS", 4), ("EI_DATA", 5)):
                if field in str(e):
                    raise self.err(at, f"invalid ELF {field}", "1 or 2",
                                   repr(src.read_exact(at, 1, field))) from None
            if src.size < ELF64_EHDR_SIZE:
                raise self.err(0, "truncated ELF header", f"{ELF64_EHDR_SIZE} bytes",
                               f"{src.size} bytes") from None
            raise self.lib_err(0, "ELF header", e) from None
        if elf.elfclass != 64:
            raise self.err(4, "unsupported ELF class (only 64-bit cores are supported)",
                           "ELFCLASS64", f"ELFCLASS{elf.elfclass}", hint=_QEMU_ELF32_HINT)
        if not elf.little_endian:
            raise self.err(5, "unsupported byte order (only little-endian cores are supported)",
                           "ELFDATA2LSB", "ELFDATA2MSB (big-endian)")
        if src.size < ELF64_EHDR_SIZE:
            raise self.err(0, "truncated ELF header", f"{ELF64_EHDR_SIZE} bytes",
                           f"{src.size} bytes")
        e_type = elf["e_type"]
        if e_type != "ET_CORE":
            name = e_type if isinstance(e_type, str) else f"{e_type:#x}"
            raise self.err(_E_TYPE_OFFSET, f"not a core file: e_type is {name}", "ET_CORE", name)
        machine = elf["e_machine"]
        self.image.machine = machine if isinstance(machine, str) else f"{machine:#x}"
        return elf

    # program headers

    def _program_headers(self, elf: ELFFile) -> Tuple[List[Dict[str, int]],
                                                        List[Tuple[int, int, int]]]:
        src = self.src
        phoff = int(elf["e_phoff"])
        phentsize = int(elf["e_phentsize"])
        try:
            count = int(elf.num_segments())
        except _LIB_ERRORS as e:
            raise self.lib_err(0, "program header count (e_phnum is PN_XNUM, read from section 0)",
                               e) from None
        if count == 0:
            raise self.err(0, "no program headers (e_phnum is 0)", "PT_LOAD segments", "none")
        if count > MAX_SEGMENTS:
            raise self.err(0, "absurd number of program headers", f"<= {MAX_SEGMENTS}", count)
        if phentsize < ELF64_PHDR_SIZE:
            raise self.err(_E_PHENTSIZE_OFFSET, "program header entry size (e_phentsize)",
                           f">= {ELF64_PHDR_SIZE}", phentsize)
        if phoff < ELF64_EHDR_SIZE or phoff + count * phentsize > src.size:
            raise self.err(phoff, "program header table outside the file",
                           f"[{ELF64_EHDR_SIZE:#x}, {src.size:#x})",
                           f"[{phoff:#x}, {phoff + count * phentsize:#x}) "
                           f"({count} headers of {phentsize} bytes)")
        self.image.segments = count
        loads: List[Dict[str, int]] = []
        notes: List[Tuple[int, int, int]] = []
        for i in range(count):
            at = phoff + i * phentsize
            try:
                ph = struct_parse(elf.structs.Elf_Phdr, self.io, stream_pos=at)
                p_type = ph["p_type"]
                fields = {k: int(ph[k]) for k in ("p_offset", "p_vaddr", "p_paddr", "p_filesz",
                                                  "p_memsz", "p_flags")}
            except _LIB_ERRORS as e:
                raise self.lib_err(at, f"program header {i}", e) from None
            if p_type not in ("PT_LOAD", "PT_NOTE"):
                continue
            offset, filesz, memsz = fields["p_offset"], fields["p_filesz"], fields["p_memsz"]
            if offset + filesz > src.size:
                raise self.err(at, f"{p_type} segment {i} runs past the end of the file",
                               f"p_offset + p_filesz <= {src.size:#x}",
                               f"{offset:#x} + {filesz:#x} = {offset + filesz:#x}",
                               hint="truncated file?")
            if p_type == "PT_NOTE":
                if filesz > MAX_NOTES_BYTES:
                    raise self.err(at, f"absurd PT_NOTE size of segment {i}",
                                   f"<= {MAX_NOTES_BYTES:#x}", f"{filesz:#x}")
                notes.append((offset, filesz, at))
                continue
            if filesz > memsz:
                raise self.err(at, f"PT_LOAD segment {i}: p_filesz larger than p_memsz",
                               f"p_filesz <= {memsz:#x}", f"{filesz:#x}")
            if memsz > MAX_SEGMENT_BYTES:
                raise self.err(at, f"absurd size of PT_LOAD segment {i}",
                               f"p_memsz <= {MAX_SEGMENT_BYTES:#x}", f"{memsz:#x}")
            if memsz == 0:
                continue
            fields.update(index=i, header_offset=at)
            loads.append(fields)
        if not loads:
            raise self.err(phoff, "no PT_LOAD segments with memory", ">= 1 PT_LOAD with p_memsz > 0",
                           f"none in {count} program headers")
        return loads, notes

    # notes

    def _notes(self, elf: ELFFile, offset: int, size: int, header_offset: int) -> None:
        end = offset + size
        at = offset
        try:
            seg = NoteSegment(struct_parse(elf.structs.Elf_Phdr, self.io,
                                           stream_pos=header_offset), self.io, elf)
            self.stream.limit = end
            for note in seg.iter_notes():
                at = int(note["n_offset"])
                namesz, descsz = int(note["n_namesz"]), int(note["n_descsz"])
                name_end = at + ELF64_NHDR_SIZE + (namesz + 3) // 4 * 4
                if name_end + descsz > end:
                    raise self.err(at, "note runs past the end of its PT_NOTE segment",
                                   f"end <= {end:#x}", f"{name_end + descsz:#x} "
                                   f"(n_namesz {namesz}, n_descsz {descsz})")
                n_type = note["n_type"]
                if isinstance(n_type, str):
                    number = _NOTE_NUMBERS.get(n_type)
                    if number is None:
                        raise self.err(at, "note type", "a known note type name", repr(n_type))
                    type_name = n_type
                else:
                    number = int(n_type)
                    type_name = _OWNER_NOTE_TYPES.get((note["n_name"] or "", number),
                                                      f"{number:#x}")
                if len(self.image.notes) >= MAX_NOTES:
                    raise self.err(at, f"too many notes (the limit is {MAX_NOTES}; set "
                                   "UFFDPY_MAX_NOTES to raise it)", f"<= {MAX_NOTES} notes",
                                   "more")
                self.image.notes.append(ElfNote(name=note["n_name"] or "", type=number,
                                                type_name=type_name, offset=at, size=descsz,
                                                desc_offset=name_end))
                at = at + int(note["n_size"])
        except ElfImageError:
            raise
        except _LIB_ERRORS as e:
            raise self.lib_err(at, f"note in the PT_NOTE segment at {header_offset:#x}",
                               e) from None
        finally:
            self.stream.limit = self.src.size

    # regions

    def _regions(self, loads: List[Dict[str, int]]) -> None:
        image = self.image
        physical = (any(n.name == "QEMU" for n in image.notes)
                    or any(ph["p_paddr"] for ph in loads))
        image.address_space = "guest-physical" if physical else "virtual"
        key = "p_paddr" if physical else "p_vaddr"
        total = 0
        for ph in loads:
            address = ph[key]
            at = ph["header_offset"]
            field = key[2:]
            if address % PAGE_SIZE:
                raise self.err(at, f"{field} of PT_LOAD segment {ph['index']} is not page-aligned",
                               f"a multiple of {PAGE_SIZE:#x}", f"{address:#x}")
            length = -(-ph["p_memsz"] // PAGE_SIZE) * PAGE_SIZE
            if address + length > 1 << 64:
                raise self.err(at, f"PT_LOAD segment {ph['index']} wraps around the "
                               f"{image.address_space} address space",
                               f"{field} + p_memsz <= 2**64", f"{address:#x} + {length:#x}")
            total += length
            if total > MAX_TOTAL_BYTES:
                raise self.err(at, "absurd total size of the PT_LOAD segments",
                               f"<= {MAX_TOTAL_BYTES:#x}", f"{total:#x}")
            image.regions.append(ElfRegion(
                self.src, address=address, vaddr=ph["p_vaddr"], paddr=ph["p_paddr"],
                memsz=ph["p_memsz"], file_offset=ph["p_offset"], file_bytes=ph["p_filesz"],
                flags=ph["p_flags"], segment_index=ph["index"], header_offset=at))
        ordered = sorted(image.regions, key=lambda r: r.address)
        for prev, cur in zip(ordered, ordered[1:]):
            if cur.address < prev.end:
                later, earlier = ((cur, prev) if cur.segment_index > prev.segment_index
                                  else (prev, cur))
                hint = ("a dump-guest-memory with paging: true maps one physical page at many "
                        "virtual addresses; dump with paging: false"
                        if physical and any(n.name == "QEMU" for n in image.notes) else None)
                raise self.err(later.header_offset,
                               f"PT_LOAD segment {later.segment_index} overlaps segment "
                               f"{earlier.segment_index} in the {image.address_space} "
                               "address space", "disjoint segments",
                               f"{later.name} and {earlier.name}", hint=hint)
