"""What the loader needs from a memory image, and nothing more (pure file-format code).

A *page source* is a file that holds the contents of one or more memory
regions.  The loader, ``inspect``, ``dump`` and ``bench`` see a source only
through the small interface below, so a QEMU mapped-ram snapshot
(:mod:`uffdpy.mappedram`) and an ELF core (:mod:`uffdpy.elfcore`) are loaded by
the same fault loop, prefetcher and claim map.

The interface (structural: nothing has to inherit from anything):

``PageSource``
    ``path``, ``file_size``, ``format`` (``"mapped-ram"``, ``"elf-core"``),
    ``regions`` (a sequence of ``PageRegion``, file order), ``region(name)``,
    ``fileno()``, ``close()`` (idempotent) and the context-manager methods.

``PageRegion``
    ``name`` (unique in its source), ``length`` (bytes of memory, a multiple of
    ``page_size``), ``page_size``, ``pages``, ``present_pages``,
    ``zero_pages``; ``bitmap`` (bit *i*, ``bitmap[i >> 3] >> (i & 7) & 1``,
    set when page *i* has data; bits past ``pages`` are ignored);
    ``is_present(i)``; ``runs()`` yielding maximal
    ``(first_page, count, present)`` runs in order; ``read_pages(first, count)``
    (an independent, plain-``pread`` path to the bytes, zeros for zero pages).
    And where the bytes live: page *i* of a present run starts at file offset
    ``file_offset + i * page_size``; only the first ``file_bytes`` bytes of
    the region are in the file, the rest of the region reads as zeros.
    Mapped-ram blocks have ``file_bytes == length`` and a bitmap for zero
    pages; an ELF ``PT_LOAD`` segment has ``file_bytes = p_filesz`` (its
    tail up to ``p_memsz`` is zeros) and a file offset that need not be
    page-aligned.

The loader copies straight from a read-only mmap of the file when a range is
page-aligned in the file and lies inside ``file_bytes``; anything else goes
through a bounce buffer.  That decision is the loader's, made from the two
numbers above, so a new format only describes where its bytes are.

Every format error is an :class:`ImageError`: one line naming the file, the
offset, what was read, what was expected and what was found.
"""
from __future__ import annotations

import importlib
import os
import re
import stat
from typing import Any, ClassVar, Iterator, Optional, Protocol, Sequence, Tuple, Type, TypeVar, Union

from .errors import UffdpyError
from .record import Record
from .sizes import parse_size

__all__ = ["ImageError", "RegionNotFound", "ImageFile", "OpenImage", "PageRegion", "RegionBase",
           "PageSource", "open_image",
           "sniff_format", "FORMATS", "ImageFormat", "format_of", "memory_limit",
           "memory_limit_origin", "check_fits_in_memory", "physical_memory_bytes"]

PathLike = Union[str, "os.PathLike[str]"]


class ImageError(UffdpyError, ValueError):
    """A memory image file is malformed, or is not a format uffdpy reads.

    Attributes: ``path`` (the file), ``offset`` (absolute file offset of the
    offending bytes, or None), ``what`` (what was being read), ``expected`` and
    ``actual`` (human-readable descriptions), ``hint`` (what to do, or None).
    """

    def __init__(self, path: object, offset: Optional[int], what: str,
                 expected: object = None, actual: object = None,
                 hint: Optional[str] = None) -> None:
        self.path = str(path)
        self.offset = offset
        self.what = what
        self.expected = expected
        self.actual = actual
        self.hint = hint
        msg = f"{self.path}: {what}"
        if offset is not None:
            msg += f" at offset {offset:#x}"
        if expected is not None or actual is not None:
            msg += f": expected {expected}, got {actual}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class RegionNotFound(UffdpyError, KeyError):
    """An image has no region (RAMBlock, segment) of the name or address asked for.

    A ``KeyError`` (as a mapping lookup would raise) whose ``str`` is the
    message itself, not its ``repr``.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such region"


class ImageFile:
    """An open image file read with ``pread``; every read is exact or raises ``error``.

    Formats subclass it to set ``error`` (their ImageError subclass) and
    ``noun`` (how the file is called in messages).
    """

    error: ClassVar[Type[ImageError]] = ImageError
    noun: ClassVar[str] = "image"

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self.fd = open_for_reading(self.path)
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def read_exact(self, offset: int, count: int, what: str) -> bytes:
        """Exactly ``count`` bytes at ``offset``.

        Raises: ``error`` if the file is shorter; ValueError if it is closed.
        """
        if self.fd < 0:
            raise ValueError(f"{self.path}: I/O on a closed {self.noun}")
        if offset < 0 or count < 0 or offset + count > self.size:
            raise self.error(self.path, offset, f"{what} runs past the end of the file",
                             f"{count} bytes", f"{max(0, self.size - offset)} bytes left")
        chunks = []
        done = 0
        while done < count:
            chunk = os.pread(self.fd, count - done, offset + done)
            if not chunk:
                raise self.error(self.path, offset + done, f"{what}: file shrank while reading",
                                 f"{count} bytes", f"{done} bytes")
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_I = TypeVar("_I", bound="OpenImage")


class OpenImage:
    """What every open image object shares: its file, ``fileno()``, ``read_range()``, closing.

    Subclasses set ``path`` and ``_source`` (an :class:`ImageFile`) and name
    themselves in ``noun`` for messages.
    """

    noun: ClassVar[str] = "image"
    path: str
    _source: Optional[ImageFile]

    def fileno(self) -> int:
        """The open file descriptor. Raises: ValueError if closed."""
        if self._source is None or self._source.fd < 0:
            raise ValueError(f"{self.path}: {self.noun} is closed")
        return self._source.fd

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file.

        Raises: ImageError (of the format) past EOF; ValueError if closed.
        """
        if self._source is None:
            raise ValueError(f"{self.path}: {self.noun} is closed")
        return self._source.read_exact(start, end - start, "byte range")

    @property
    def closed(self) -> bool:
        return self._source is None

    def close(self) -> None:
        """Close the file; safe to call more than once."""
        source, self._source = self._source, None
        if source is not None:
            source.close()

    def __enter__(self: _I) -> _I:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PageRegion(Protocol):
    """One region of a page source (see the module docstring)."""

    name: str
    length: int
    page_size: int
    pages: int
    present_pages: int
    zero_pages: int
    file_offset: int
    file_bytes: int

    @property
    def bitmap(self) -> bytes: ...
    def is_present(self, i: int) -> bool: ...
    def runs(self) -> Iterator[Tuple[int, int, bool]]: ...
    def read_pages(self, first: int, count: int) -> bytes: ...


class RegionBase:
    """What the formats' regions share: page indexes checked, file offsets, one-page reads.

    A format's region class sets ``name``, ``pages``, ``page_size`` and
    ``file_offset`` and defines ``is_present`` and ``read_pages``; ``noun``
    names it in errors ("block" for a RAMBlock).
    """

    noun: ClassVar[str] = "region"
    name: str
    pages: int
    page_size: int
    file_offset: int

    def _set_geometry(self, source: Any, *, name: str, length: int, page_size: int,
                      file_offset: int, file_bytes: int, header_offset: int) -> None:
        """What every region has: its file, name, length in bytes and pages, where its
        bytes start in the file and how many there are, and where its header is."""
        self._source = source
        self.name = name
        self.length = length
        self.page_size = page_size
        self.pages = length // page_size
        self.file_offset = file_offset
        self.file_bytes = file_bytes
        self.header_offset = header_offset

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.pages:
            raise IndexError(f"page {i} out of range for {self.noun} {self.name!r} "
                             f"of {self.pages} pages")

    def _check_range(self, first: int, count: int) -> None:
        if count < 0 or first < 0 or first + count > self.pages:
            raise IndexError(f"pages [{first}, {first + count}) out of range for {self.noun} "
                             f"{self.name!r} of {self.pages} pages")

    def page_offset(self, i: int) -> int:
        """File offset of page ``i`` (``file_offset + i * page_size``), present or not.

        Raises: IndexError if ``i`` is not a page of this region.
        """
        self._check_index(i)
        return self.file_offset + i * self.page_size

    def read_page(self, i: int) -> bytes:
        """The ``page_size`` bytes of page ``i`` (zeros where the file holds none).

        Raises: IndexError for a bad index; the format's ImageError if the file
        is shorter than it was when opened; ValueError if the image is closed.
        """
        return self.read_pages(i, 1)

    def read_pages(self, first: int, count: int) -> bytes:  # pragma: no cover - per format
        raise NotImplementedError


class PageSource(Protocol):
    """A memory image file (see the module docstring)."""

    path: str
    file_size: int
    format: str

    @property
    def regions(self) -> Sequence[PageRegion]: ...
    def region(self, name: str) -> PageRegion: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> "PageSource": ...
    def __exit__(self, *exc: object) -> None: ...


# --- what an untrusted file may make uffdpy allocate ----------------------------------

#: the environment variable that raises :func:`memory_limit` (a size: 64G, 1T, bytes)
MEMORY_LIMIT_ENV = "UFFDPY_MAX_MEMORY"


def physical_memory_bytes() -> int:
    """This machine's RAM in bytes (``sysconf``)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_limit() -> int:
    """The most guest memory uffdpy will map for one image: this machine's RAM,
    or ``$UFFDPY_MAX_MEMORY`` (``64G``, ``1T``, bytes) when set.

    Every page of a load ends resident, so an image declaring more memory than
    the machine has cannot be loaded here; refusing it up front spares the
    tens of seconds and the per-page tables a 1 TiB segment in a 5 MB file
    would cost before failing.
    """
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return physical_memory_bytes()
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"${MEMORY_LIMIT_ENV}={text!r} is not a size (use e.g. 64G, 1T)") from None


def memory_limit_origin() -> Optional[str]:
    """``"$UFFDPY_MAX_MEMORY"`` when that sets :func:`memory_limit`, else None (the machine's RAM)."""
    return f"${MEMORY_LIMIT_ENV}" if os.environ.get(MEMORY_LIMIT_ENV, "").strip() else None


def check_fits_in_memory(source: "PageSource") -> None:
    """Refuse ``source`` if its regions together declare more than :func:`memory_limit`.

    Raises: ImageError naming the file, the total, the limit and how to raise it.
    """
    total = sum(r.length for r in source.regions)
    limit = memory_limit()
    if total > limit:
        where = memory_limit_origin() or "this machine's RAM"
        raise ImageError(source.path, None, "guest memory the image declares",
                         f"at most {limit:#x} bytes ({where})", f"{total:#x} bytes",
                         hint=f"set {MEMORY_LIMIT_ENV}=SIZE to load it anyway")


# --- bitmaps, shared by the formats ----------------------------------------------------

POPCOUNT = bytes(bin(i).count("1") for i in range(256))
_BIT_POSITIONS = tuple(tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256))
_NONZERO_BYTE = re.compile(rb"[^\x00]")


def bitmap_runs(bits: bytes, pages: int) -> Iterator[Tuple[int, int, bool]]:
    """Maximal (first, count, present) runs of the first ``pages`` bits of ``bits``.

    Bit *i* is ``bits[i >> 3] >> (i & 7) & 1``.  XOR-ing the bitmap (as one
    big integer) with itself shifted by one bit leaves a bit set exactly where
    a run starts; a regex in C finds the few non-zero bytes of that, so the
    Python work is proportional to the number of runs, not of pages.
    """
    if pages <= 0:
        return
    mask = (1 << pages) - 1
    x = int.from_bytes(bits[:(pages + 7) // 8], "little") & mask
    starts = ((x ^ (x << 1)) & mask).to_bytes((pages + 7) // 8, "little")
    first = 0
    present = bool(x & 1)
    for m in _NONZERO_BYTE.finditer(starts):
        base = m.start() * 8
        for bit in _BIT_POSITIONS[starts[m.start()]]:
            pos = base + bit
            if pos:
                yield (first, pos - first, present)
                first, present = pos, not present
    yield (first, pages - first, present)


def bitmap_runs_in(bits: bytes, first: int, end: int) -> Iterator[Tuple[int, int, bool]]:
    """Maximal (first, count, present) runs of bits ``[first, end)``, in order."""
    if end <= first:
        return
    lo, hi = first >> 3, (end + 7) >> 3
    for f, c, p in bitmap_runs(bits[lo:hi], (hi - lo) * 8):
        f += lo * 8
        s, e = max(f, first), min(f + c, end)
        if s < e:
            yield (s, e - s, p)


def count_bits(bits: bytes, first: int, end: int) -> int:
    """How many of bits ``[first, end)`` are set."""
    if end <= first:
        return 0
    x = int.from_bytes(bits[first >> 3:(end + 7) >> 3], "little") >> (first & 7)
    return bin(x & ((1 << (end - first)) - 1)).count("1")


def set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set bits [first, first+count) of a little-endian bitmap."""
    end = first + count
    while first < end and first & 7:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    full_end = end & ~7
    if first < full_end:
        bitmap[first >> 3:full_end >> 3] = b"\xff" * ((full_end - first) >> 3)
        first = full_end
    while first < end:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1


# --- opening any supported image ---------------------------------------------------------

_ELF_MAGIC = b"\x7fELF"
_QEVM_MAGIC = b"QEVM"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))


def open_for_reading(path: PathLike) -> int:
    """Open an image file read-only; return the fd (``O_CLOEXEC``).

    Only a regular file or a block device is an image: anything else is
    refused before a read could block on it forever (a FIFO with no writer, a
    terminal).  The open itself is ``O_NONBLOCK`` for the same reason (on a
    regular file or a block device the flag changes nothing).

    Raises: OSError if it cannot be opened; ImageError for any other kind of file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        raise ImageError(path, None, "not an image file", "a regular file or a block device",
                         kind)
    return fd


class ImageFormat(Record, frozen=True):
    """A file format uffdpy reads: how to recognise it and which class opens it.

    ``opener`` is ``"module:Class"``, imported when a file of the format is
    opened: this module names the formats without importing them (they import
    it), and a new page source is one entry in :data:`FORMATS`.
    """

    name: str           #: ``PageSource.format``: "mapped-ram", "elf-core"
    magic: bytes        #: the file's first bytes
    opener: str         #: ``"uffdpy.mappedram:Snapshot"``: a class with ``open(path)``
    description: str    #: for errors: "a QEMU migration stream"
    #: whether ``open(path, offset=N)`` reads a stream that starts N bytes into
    #: the file (``--offset``: a migration stream inside a bigger file)
    takes_offset: bool = False

    def cls(self) -> Any:
        """The class that opens files of this format."""
        module, _, name = self.opener.partition(":")
        return getattr(importlib.import_module(module), name)

    def describe(self) -> str:
        """``a QEMU migration stream (51 45 56 4d, 'QEVM')``."""
        text = "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in self.magic)
        return f"{self.description} ({self.magic.hex(' ')}, '{text}')"


#: Every format, tried in order by their magic.
FORMATS: Tuple[ImageFormat, ...] = (
    ImageFormat("elf-core", _ELF_MAGIC, "uffdpy.elfcore:ElfImage", "an ELF core"),
    ImageFormat("mapped-ram", _QEVM_MAGIC, "uffdpy.mappedram:Snapshot",
                "a QEMU migration stream", takes_offset=True),
)


def format_of(head: bytes) -> Optional[ImageFormat]:
    """The format whose magic ``head`` (a file's first bytes) starts with, or None."""
    return next((f for f in FORMATS if head.startswith(f.magic)), None)


def sniff_format(path: PathLike) -> str:
    """The name of the format ``path`` holds by its magic; ``"mapped-ram"`` for no known magic
    (whose opener then says what it found).

    Raises: OSError if the file cannot be read; ImageError if it is not a
    regular file or a block device.
    """
    fd = open_for_reading(path)
    try:
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    found = format_of(head)
    return found.name if found is not None else "mapped-ram"


def open_image(path: PathLike) -> PageSource:
    """Open a memory image of any format in :data:`FORMATS`, told apart by its first bytes.

    Raises: OSError if the file cannot be opened; ImageError (MappedRamError or
    ElfImageError) if it is malformed or of no known format.
    """
    name = sniff_format(path)
    fmt = next(f for f in FORMATS if f.name == name)
    opened: PageSource = fmt.cls().open(path)
    return opened
