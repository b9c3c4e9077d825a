"""QEMU's migration stream as a postcopy *source* writes it, and its return path.

No kernel calls and no sockets: this module makes bytes and parses bytes.
:mod:`uffdpy.resume` sends them.

What a postcopy source sends (QEMU 10.0.2, ``migration/savevm.c`` and
``migration/ram.c``; every integer big-endian)::

    header         "QEVM", be32 3
    configuration  07, be32 n, machine type, [05 subsections]   (no capabilities
                   subsection: the destination runs without mapped-ram)
    commands       08, be16 cmd, be16 len, payload
                   OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE
    "ram" START    01 sid "ram" instance version, MEM_SIZE word, per block
                   (u8 n, idstr, be64 used_length), EOS, footer 7e sid
    commands       SWITCHOVER_START, POSTCOPY_RAM_DISCARD (one is mandatory:
                   without it LISTEN leaves the state at DISCARD and RUN fails),
                   PING 2
    PACKAGED       be32 L, then L bytes: LISTEN, the device sections copied
                   verbatim from the snapshot, PING 3, RUN
    PING 4
    pages          PART sections (02 sid, records, EOS, footer); a record is
                   be64 (offset | flags), [u8 n, idstr unless CONTINUE], then
                   4096 bytes (PAGE) or one 0 byte (ZERO)
    END, EOF       03 sid EOS footer; 00

The return path is the same connection read the other way: be16 type, be16
len, payload; RECV_BITMAP (recovery only) carries more bytes after its
declared length.  :class:`ReturnPath` parses it incrementally from whatever
bytes have arrived, so a caller can poll a non-blocking socket.

``reference/postcopy-stream.md`` (shared with the project) has the byte-level
walk-through and what QEMU does with each item; this module follows it.
"""
from __future__ import annotations

import enum
import struct
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .errors import UffdpyError

__all__ = [
    "MigCmd", "RpType", "RamFlag", "StreamError", "counted",
    "header", "configuration", "command", "open_return_path", "ping", "postcopy_advise",
    "ram_start", "switchover_start", "postcopy_ram_discard", "packaged", "postcopy_listen",
    "postcopy_run", "recv_bitmap", "postcopy_resume", "part_start", "part_end",
    "page_header", "zero_record", "end_section", "EOF",
    "RpMessage", "Shut", "Pong", "ReqPages", "RecvBitmap", "ResumeAck", "ReturnPath",
]

# The stream's vocabulary, under QEMU's own names (migration/savevm.c, migration/ram.c):
# this module owns it; the mapped-ram reader and writer (uffdpy.mappedram) import it.
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

#: ``RAM_SAVE_FLAG_*`` as plain ints (the bits of :class:`RamFlag`, and those only a
#: reader meets: FULL, XBZRLE, HOOK, MULTIFD_FLUSH)
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

RAM_SECTION_VERSION = 4
TARGET_PAGE_SIZE = 4096
#: the mark that ends a RECV_BITMAP payload (``RAMBLOCK_RECV_BITMAP_ENDING``)
RECV_BITMAP_ENDING = 0x0123456789ABCDEF

EOF = bytes([QEMU_VM_EOF])

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_CMD = struct.Struct(">BHH")
_RP = struct.Struct(">HH")
#: a whole REQ_PAGES message: type, length 12, be64 start, be32 length
_REQ_PAGES = struct.Struct(">HHQI")


class MigCmd(enum.IntEnum):
    """``enum qemu_vm_cmd`` (``migration/savevm.c``): the payload of a COMMAND section."""
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class RpType(enum.IntEnum):
    """``enum mig_rp_message_type`` (``migration/migration.c``): return-path messages."""
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


#: REQ_PAGES's type as a plain int, for the parser's fast path
_REQ_PAGES_TYPE = int(RpType.REQ_PAGES)


class RamFlag(enum.IntFlag):
    """``RAM_SAVE_FLAG_*`` (``migration/ram.c``), in the low bits of a record's offset word."""
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20


class StreamError(UffdpyError, ValueError):
    """Bytes that are not what the protocol allows (a malformed return-path message)."""


def counted(name: str) -> bytes:
    """A counted string (u8 length, ASCII bytes): the stream's names of blocks and sections.

    Raises: ValueError for a name that is not 1..255 ASCII bytes.
    """
    raw = name.encode("ascii")
    if not 0 < len(raw) < 256:
        raise ValueError(f"a stream name is 1..255 ASCII bytes, not {name!r}")
    return bytes([len(raw)]) + raw


_name = counted


# ------------------------------------------------------------------ source -> destination

def header() -> bytes:
    """The file header: magic and version 3."""
    return _BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION)


def configuration(machine: str, *, uuid: Optional[bytes] = None,
                  capabilities: Sequence[str] = ()) -> bytes:
    """The configuration section for machine type ``machine`` (e.g. ``pc-q35-10.0``).

    ``capabilities`` adds the ``configuration/capabilities`` subsection (a
    mapped-ram file has one); a stream to a live destination has none (the
    destination validates the received set against its own, and it runs
    without mapped-ram: 10.0.2 refuses mapped-ram with postcopy).  ``uuid``
    (16 bytes) adds the ``configuration/uuid`` subsection the snapshot had.
    """
    raw = machine.encode("ascii")
    out = bytes([QEMU_VM_CONFIGURATION]) + _BE32.pack(len(raw)) + raw
    if capabilities:
        out += (bytes([QEMU_VM_SUBSECTION]) + counted("configuration/capabilities")
                + _BE32.pack(1) + _BE32.pack(len(capabilities))
                + b"".join(counted(cap) for cap in capabilities))
    if uuid is not None:
        if len(uuid) != 16:
            raise ValueError(f"a uuid is 16 bytes, not {len(uuid)}")
        out += bytes([QEMU_VM_SUBSECTION]) + _name("configuration/uuid") + _BE32.pack(1) + uuid
    return out


def command(cmd: MigCmd, payload: bytes = b"") -> bytes:
    """A COMMAND section: ``08``, be16 command, be16 length, payload."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"{cmd.name} payload of {len(payload)} bytes exceeds 65535")
    return _CMD.pack(QEMU_VM_COMMAND, cmd, len(payload)) + payload


def open_return_path() -> bytes:
    return command(MigCmd.OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    """PING ``value``: the destination answers PONG ``value`` when it reads this far."""
    return command(MigCmd.PING, _BE32.pack(value))


def postcopy_advise(page_size_summary: int, target_page_size: int = TARGET_PAGE_SIZE) -> bytes:
    """POSTCOPY_ADVISE: the OR of every block's host page size, and the target page size (bytes)."""
    return command(MigCmd.POSTCOPY_ADVISE, _BE64.pack(page_size_summary)
                   + _BE64.pack(target_page_size))


def ram_start(section_id: int, blocks: Sequence[Tuple[str, int]],
              *, instance: int = 0, version: int = RAM_SECTION_VERSION) -> bytes:
    """The "ram" START section in the normal layout: ``(idstr, used_length_bytes)`` per block.

    ``section_id`` must not be 0 (handlers never loaded have id 0) and must
    be repeated by every PART and END section.
    """
    if section_id <= 0:
        raise ValueError("the ram section id must be >= 1")
    total = sum(length for _, length in blocks)
    body = _BE64.pack(total | RamFlag.MEM_SIZE)
    for name, length in blocks:
        body += _name(name) + _BE64.pack(length)
    body += _BE64.pack(RamFlag.EOS)
    return (bytes([QEMU_VM_SECTION_START]) + _BE32.pack(section_id) + _name("ram")
            + _BE32.pack(instance) + _BE32.pack(version) + body + _footer(section_id))


def _footer(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(section_id)


def switchover_start() -> bytes:
    return command(MigCmd.SWITCHOVER_START)


def postcopy_ram_discard(block: str, ranges: Iterable[Tuple[int, int]]) -> bytes:
    """POSTCOPY_RAM_DISCARD of ``(start_bytes, length_bytes)`` ranges inside ``block``."""
    pairs = b"".join(_BE64.pack(start) + _BE64.pack(length) for start, length in ranges)
    if not pairs:
        raise ValueError("a discard needs at least one range")
    return command(MigCmd.POSTCOPY_RAM_DISCARD, b"\x00" + _name(block) + b"\x00" + pairs)


def postcopy_listen() -> bytes:
    return command(MigCmd.POSTCOPY_LISTEN)


def postcopy_run() -> bytes:
    return command(MigCmd.POSTCOPY_RUN)


def packaged(blob: bytes) -> bytes:
    """PACKAGED: the destination reads ``blob`` whole, then loads it as a nested stream."""
    if len(blob) > 0xFFFFFFFF:
        raise ValueError("a package is at most 4 GiB - 1")
    return command(MigCmd.PACKAGED, _BE32.pack(len(blob))) + blob


def recv_bitmap(block: str) -> bytes:
    """RECV_BITMAP (recovery): ask for the received-page bitmap of ``block``."""
    return command(MigCmd.RECV_BITMAP, _name(block))


def postcopy_resume() -> bytes:
    """POSTCOPY_RESUME (recovery): the new source is ready; requests start again."""
    return command(MigCmd.POSTCOPY_RESUME)


def part_start(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_PART]) + _BE32.pack(section_id)


def part_end(section_id: int) -> bytes:
    """The EOS word and footer that close a PART section."""
    return _BE64.pack(RamFlag.EOS) + _footer(section_id)


def end_section(section_id: int) -> bytes:
    return bytes([QEMU_VM_SECTION_END]) + _BE32.pack(section_id) + part_end(section_id)


# plain ints for the per-page path (an IntFlag "|" costs microseconds)
_PAGE = int(RamFlag.PAGE)
_PAGE_CONTINUE = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO = int(RamFlag.ZERO)
_ZERO_CONTINUE = int(RamFlag.ZERO | RamFlag.CONTINUE)
_pack64 = _BE64.pack


def page_header(offset: int, block: Optional[str]) -> bytes:
    """The header of a PAGE record for byte ``offset`` of ``block`` (None: CONTINUE, same block).

    4096 bytes of page data follow it.
    """
    if block is None:
        return _pack64(offset | _PAGE_CONTINUE)
    return _pack64(offset | _PAGE) + _name(block)


def zero_record(offset: int, block: Optional[str]) -> bytes:
    """A whole ZERO record for byte ``offset`` of ``block`` (None: CONTINUE)."""
    if block is None:
        return _pack64(offset | _ZERO_CONTINUE) + b"\x00"
    return _pack64(offset | _ZERO) + _name(block) + b"\x00"


# ------------------------------------------------------------------ destination -> source

# The messages are named tuples, not frozen dataclasses: the command imports
# this module on the way to its connect, and each frozen dataclass costs 0.4 ms
# to make (a named tuple 0.06).  Compare them with their type: a Pong(0) equals
# a Shut(0) as tuples.

class Shut(NamedTuple):
    """SHUT: the destination is done; ``error`` 0 means it loaded everything."""
    error: int


class Pong(NamedTuple):
    """PONG: the answer to PING ``value``."""
    value: int


class ReqPages(NamedTuple):
    """A page request: ``length`` bytes at byte ``start`` of ``block`` (resolved for REQ_PAGES)."""
    block: str
    start: int
    length: int


class RecvBitmap(NamedTuple):
    """A block's received-page bitmap (recovery): bit i set = target page i is in place."""
    block: str
    bitmap: bytes

    def received(self, i: int) -> bool:
        return bool(self.bitmap[i >> 3] >> (i & 7) & 1)


class ResumeAck(NamedTuple):
    """RESUME_ACK: the destination resumes the load (recovery)."""
    value: int


RpMessage = Union[Shut, Pong, ReqPages, RecvBitmap, ResumeAck]

#: the payload length each type must have (None: variable)
_RP_LENGTHS = {RpType.SHUT: 4, RpType.PONG: 4, RpType.REQ_PAGES: 12, RpType.RESUME_ACK: 4,
               RpType.REQ_PAGES_ID: None, RpType.RECV_BITMAP: None}
_MAX_BITMAP_BYTES = 1 << 34          # 128 Ti pages: more is no QEMU's


class ReturnPath:
    """Incremental parser of the destination's return path.

    :meth:`feed` the bytes as they arrive; :meth:`messages` returns the whole
    messages parsed so far.  REQ_PAGES (no block name) is resolved against the
    block of the last REQ_PAGES_ID, as the destination expects; call
    :meth:`reset_block` on a new connection (recovery).

    Raises (from :meth:`feed`): StreamError for an unknown type, a wrong
    length, a REQ_PAGES before any REQ_PAGES_ID, a RECV_BITMAP without its
    end mark, or SWITCHOVER_ACK (a capability this source never sets).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out: List[RpMessage] = []
        self._last_block: Optional[str] = None

    def reset_block(self) -> None:
        self._last_block = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self._parse_one():
            pass

    def messages(self) -> List[RpMessage]:
        out, self._out = self._out, []
        return out

    def _parse_one(self) -> bool:
        buf = self._buf
        if len(buf) < 4:
            return False
        kind, length = _RP.unpack_from(buf, 0)
        if kind == _REQ_PAGES_TYPE and length == 12 and self._last_block is not None \
                and len(buf) >= 16:
            # REQ_PAGES, nearly every message of a resume: read in place (the general
            # path below costs ~4 us more: the enum, a copy of the body, the checks)
            start, size = _REQ_PAGES.unpack_from(buf, 0)[2:]
            del buf[:16]
            self._out.append(ReqPages(self._last_block, start, size))
            return True
        try:
            rp = RpType(kind)
        except ValueError:
            raise StreamError(f"return path: unknown message type {kind} "
                              f"(length {length})") from None
        if rp not in _RP_LENGTHS:
            raise StreamError(f"return path: {rp.name} was not asked for")
        want = _RP_LENGTHS[rp]
        if want is not None and length != want:
            raise StreamError(f"return path: {rp.name} of length {length}, expected {want}")
        if len(buf) < 4 + length:
            return False
        body = bytes(buf[4:4 + length])
        used = 4 + length
        msg: RpMessage
        if rp is RpType.SHUT:
            msg = Shut(_BE32.unpack(body)[0])
        elif rp is RpType.PONG:
            msg = Pong(_BE32.unpack(body)[0])
        elif rp is RpType.RESUME_ACK:
            msg = ResumeAck(_BE32.unpack(body)[0])
        elif rp is RpType.REQ_PAGES:
            if self._last_block is None:
                raise StreamError("return path: REQ_PAGES before any REQ_PAGES_ID")
            start, size = struct.unpack(">QI", body)
            msg = ReqPages(self._last_block, start, size)
        elif rp is RpType.REQ_PAGES_ID:
            if length < 14 or body[12] != length - 13:
                raise StreamError(f"return path: REQ_PAGES_ID of length {length} with a "
                                  f"name of {body[12] if length > 12 else '?'} bytes")
            start, size = struct.unpack_from(">QI", body)
            name = body[13:].decode("ascii", "replace")
            self._last_block = name
            msg = ReqPages(name, start, size)
        else:  # RECV_BITMAP: u8 n, idstr; then be64 size, bitmap, be64 end mark
            if length < 2 or body[0] != length - 1:
                raise StreamError(f"return path: RECV_BITMAP of length {length}")
            if len(buf) < used + 8:
                return False
            size = _BE64.unpack_from(buf, used)[0]
            if size > _MAX_BITMAP_BYTES or size % 8:
                raise StreamError(f"return path: RECV_BITMAP of {size} bytes")
            if len(buf) < used + 8 + size + 8:
                return False
            bitmap = bytes(buf[used + 8:used + 8 + size])
            end = _BE64.unpack_from(buf, used + 8 + size)[0]
            if end != RECV_BITMAP_ENDING:
                raise StreamError(f"return path: RECV_BITMAP end mark {end:#x}, expected "
                                  f"{RECV_BITMAP_ENDING:#x}")
            used += 16 + size
            msg = RecvBitmap(body[1:].decode("ascii", "replace"), bitmap)
        del buf[:used]
        self._out.append(msg)
        return True
