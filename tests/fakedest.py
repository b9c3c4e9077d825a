"""A fake postcopy destination for tests: parses the stream a source sends, answers like QEMU.

It plays what QEMU 10.0.2's destination does with the stream of
``reference/postcopy-stream.md`` closely enough to check a source byte for
byte, without QEMU: it reads the header, the configuration, the commands,
the "ram" START, the PACKAGED blob (skipped whole: device state cannot be
parsed without QEMU's device models), the PART/END sections and EOF; it
answers PING with PONG, asks for pages with REQ_PAGES_ID/REQ_PAGES, answers
RECV_BITMAP with the pages it holds, POSTCOPY_RESUME with RESUME_ACK, and EOF
with SHUT 0.  Every page record is checked: a block named when the channel's
previous record was of another block (else CONTINUE), no page twice (QEMU
pauses the migration on that), 4096 bytes of data or one zero byte.
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import Dict, List, Optional, Set, Tuple

from uffdpy import migstream as ms

PAGE = 4096
_BE16, _BE32, _BE64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class StreamViolation(AssertionError):
    """The source sent something QEMU's destination would refuse or pause on."""


class FakeDestination:
    """Serve one source on ``sock`` in a thread; see the module docstring.

    ``requests``: ``(block, page)`` asked for (one REQ_PAGES each) as soon as
    RUN arrives, before the source streams; ``received`` (a recovery: no
    header, and ``blocks`` gives the blocks' lengths): pages the destination
    already holds, reported in RECV_BITMAP.  After :meth:`join`,
    ``pages`` maps ``(block, page)`` to the bytes received (``None`` for a
    ZERO record) and ``order`` lists them as they arrived (with where from:
    ``"main"``); ``error`` is the first violation, if any.
    """

    def __init__(self, sock: socket.socket, *, requests: List[Tuple[str, int]] = (),
                 received: Optional[Dict[str, Set[int]]] = None,
                 blocks: Optional[Dict[str, int]] = None) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.reader = sock.makefile("rb")
        self.requests = list(requests)
        self.received = received
        self.blocks: Dict[str, int] = dict(blocks or {})    # a recovery has no START
        self.pages: Dict[Tuple[str, int], Optional[bytes]] = {}
        self.order: List[Tuple[str, int]] = []
        self.pongs: List[int] = []
        self.commands: List[int] = []
        self.duplicates: List[Tuple[str, int]] = []
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._last_rp_block: Optional[str] = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- reading

    def _read(self, n: int) -> bytes:
        data = self.reader.read(n)
        if len(data) != n:
            raise EOFError(f"the stream ended inside an item ({len(data)} of {n} bytes)")
        return data

    def _u8(self) -> int:
        return self._read(1)[0]

    def _name(self) -> str:
        return self._read(self._u8()).decode()

    def _run(self) -> None:
        try:
            self._stream()
        except BaseException as e:            # kept for the test to raise
            self.error = e
        finally:
            self.reader.close()                # its reference kept the socket's fd open
            self.done.set()

    def _stream(self) -> None:
        if self.received is None:
            if self._read(8) != ms.header():
                raise StreamViolation("bad header")
            if self._u8() != 0x07:
                raise StreamViolation("no configuration section")
            self._read(_BE32.unpack(self._read(4))[0])        # machine name
        # (a recovery stream starts with the commands: no header, no configuration)
        last: Dict[str, Optional[str]] = {"main": None}
        while True:
            kind = self._u8()
            if kind == 0x05:                                     # configuration subsection
                self._name()
                self._read(4 + 16)
            elif kind == 0x08:
                self._command()
            elif kind == 0x01:
                self._ram_start()
            elif kind in (0x02, 0x03):                           # PART, END
                self._read(4)
                self._records(last)
            elif kind == 0x00:                                   # EOF: the load completed
                self._send(1, _BE32.pack(0))
                return
            else:
                raise StreamViolation(f"unexpected section type {kind:#04x}")

    def _command(self) -> None:
        cmd = _BE16.unpack(self._read(2))[0]
        length = _BE16.unpack(self._read(2))[0]
        payload = self._read(length)
        self.commands.append(cmd)
        if cmd == ms.MigCmd.PING:
            self._send(2, payload)
        elif cmd == ms.MigCmd.PACKAGED:
            blob = self._read(_BE32.unpack(payload)[0])
            if ms.postcopy_run() not in blob or ms.postcopy_listen() not in blob:
                raise StreamViolation("a package without LISTEN and RUN")
            for ping in (3,):
                if ms.ping(ping) in blob:
                    self._send(2, _BE32.pack(ping))
            for block, page in self.requests:           # the guest runs and faults
                self.request(block, page)
        elif cmd == ms.MigCmd.RECV_BITMAP:
            self._send_bitmap(payload[1:1 + payload[0]].decode())
        elif cmd == ms.MigCmd.POSTCOPY_RESUME:
            self._send(6, _BE32.pack(1))
            for block, page in self.requests:
                self.request(block, page)

    def _ram_start(self) -> None:
        self._read(4)                                     # section id
        if self._name() != "ram":
            raise StreamViolation("the START section is not ram's")
        self._read(8)                                     # instance, version
        total = _BE64.unpack(self._read(8))[0] & ~0xfff
        seen = 0
        while seen < total:
            name = self._name()
            length = _BE64.unpack(self._read(8))[0]
            self.blocks[name] = length
            seen += length
        if _BE64.unpack(self._read(8))[0] != ms.RamFlag.EOS:
            raise StreamViolation("no EOS after the block list")
        if self._u8() != 0x7E:
            raise StreamViolation("no footer after the START section")
        self._read(4)

    def _records(self, last: Dict[str, Optional[str]]) -> None:
        while True:
            word = _BE64.unpack(self._read(8))[0]
            flags, offset = word & 0xFFF, word & ~0xFFF
            if flags == ms.RamFlag.EOS:
                if self._u8() != 0x7E:
                    raise StreamViolation("no footer after a PART section")
                self._read(4)
                return
            if flags & ms.RamFlag.CONTINUE:
                block = last["main"]
                if block is None:
                    raise StreamViolation("CONTINUE before any named record")
            else:
                block = self._name()
            last["main"] = block
            if block not in self.blocks:
                raise StreamViolation(f"a record of unknown block {block!r}")
            if flags & ms.RamFlag.PAGE:
                data: Optional[bytes] = self._read(PAGE)
            elif flags & ms.RamFlag.ZERO:
                if self._u8() != 0:
                    raise StreamViolation("a ZERO record whose byte is not 0")
                data = None
            else:
                raise StreamViolation(f"record flags {flags:#x}")
            key = (block, offset // PAGE)
            with self._lock:
                if key in self.pages:
                    self.duplicates.append(key)
                self.pages[key] = data
                self.order.append(key)

    # -- the return path

    def _send(self, kind: int, payload: bytes) -> None:
        with self._lock:
            self.sock.sendall(struct.pack(">HH", kind, len(payload)) + payload)

    def request(self, block: str, page: int, pages: int = 1) -> None:
        """Ask for ``pages`` pages from ``page`` of ``block`` (REQ_PAGES_ID, then REQ_PAGES)."""
        start = _BE64.pack(page * PAGE) + _BE32.pack(pages * PAGE)
        if block != self._last_rp_block:
            raw = block.encode()
            self._send(3, start + bytes([len(raw)]) + raw)
            self._last_rp_block = block
        else:
            self._send(4, start)

    def _send_bitmap(self, block: str) -> None:
        pages = self.blocks[block] // PAGE
        bits = bytearray((pages + 63) // 64 * 8)
        for page in (self.received or {}).get(block, set()):
            bits[page // 8] |= 1 << (page % 8)
        raw = block.encode()
        head = struct.pack(">HH", 5, len(raw) + 1) + bytes([len(raw)]) + raw
        with self._lock:
            self.sock.sendall(head + _BE64.pack(len(bits)) + bytes(bits)
                              + _BE64.pack(ms.RECV_BITMAP_ENDING))
        self._last_rp_block = None

    def join(self, timeout: float = 30) -> None:
        """Wait for the stream's end; raise the first violation seen."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"the stream did not end within {timeout:g}s")
        if self.error is not None:
            raise self.error
        if self.duplicates:
            raise StreamViolation(f"pages sent twice: {self.duplicates[:5]}")
